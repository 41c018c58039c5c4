"""A FUSE pass-through filesystem that fails fsync or write with EIO on demand, for tests.

Usage: /usr/bin/python3 faultfs.py ROOT MOUNTPOINT CONTROL

Every operation goes to the same path under ROOT. While the file CONTROL holds the word
`fsync`, fsync and fdatasync answer EIO (the write itself reaches ROOT, as a disk whose cache
flush fails would leave it); while it holds `write`, writes answer EIO. Runs in the foreground
until unmounted (`umount MOUNTPOINT`). Needs Debian's python3-fusepy (libfuse2).
"""

import errno
import os
import sys

import fusepy
from fusepy import FUSE, FuseOSError, Operations


class FaultFS(Operations):
    def __init__(self, root, control):
        self.root = os.path.realpath(root)
        self.control = control

    def _fault(self, what):
        try:
            with open(self.control) as f:
                return what in f.read().split()
        except FileNotFoundError:
            return False

    def _path(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def access(self, path, mode):
        if not os.access(self._path(path), mode):
            raise FuseOSError(errno.EACCES)

    def getattr(self, path, fh=None):
        st = os.lstat(self._path(path))
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")
        return {key: getattr(st, key) for key in keys}

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._path(path))

    def mkdir(self, path, mode):
        os.mkdir(self._path(path), mode)

    def rmdir(self, path):
        os.rmdir(self._path(path))

    def unlink(self, path):
        os.unlink(self._path(path))

    def rename(self, old, new):
        os.rename(self._path(old), self._path(new))

    def chmod(self, path, mode):
        os.chmod(self._path(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._path(path), uid, gid)

    def utimens(self, path, times=None):
        os.utime(self._path(path), times)

    def statfs(self, path):
        st = os.statvfs(self._path(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")
        return {key: getattr(st, key) for key in keys}

    def open(self, path, flags):
        return os.open(self._path(path), flags)

    def create(self, path, mode, fi=None):
        return os.open(self._path(path), os.O_WRONLY | os.O_CREAT, mode)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        if self._fault("write"):
            raise FuseOSError(errno.EIO)
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._path(path), length)

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        os.close(fh)

    def fsync(self, path, datasync, fh):
        if self._fault("fsync"):
            raise FuseOSError(errno.EIO)
        os.fsync(fh)

    def fsyncdir(self, path, datasync, fh):
        return 0


if __name__ == "__main__":
    root, mountpoint, control = sys.argv[1:4]
    # Every write reaches FaultFS (no kernel write-back cache), so a fault is seen at once.
    FUSE(FaultFS(root, control), mountpoint, foreground=True, nothreads=True, direct_io=True)
