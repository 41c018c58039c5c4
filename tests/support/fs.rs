//! Real filesystems that fail: a small tmpfs that fills up (ENOSPC) and a FUSE pass-through
//! whose fsync or write answers EIO on demand. Both need root (CI and these machines run tests
//! as root); `scripts/setup` installs the FUSE side (python3-fusepy).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether `dir` is a mount point now.
fn mounted(dir: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let dir = dir.to_string_lossy();
    mounts
        .lines()
        .any(|line| line.split(' ').nth(1) == Some(dir.as_ref()))
}

fn wait_mounted(dir: &Path, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while mounted(dir) != want {
        assert!(
            Instant::now() < deadline,
            "{} did not get {}mounted within 20 s",
            dir.display(),
            if want { "" } else { "un" }
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn umount(dir: &Path) {
    let _ = Command::new("umount").arg(dir).status();
    if mounted(dir) {
        let _ = Command::new("umount").arg("-l").arg(dir).status();
    }
}

/// A tmpfs of a fixed size, unmounted when dropped.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it, e.g. `2m`).
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount -t tmpfs failed (tests run as root)"
        );
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the filesystem with a file, leaving about `leave` bytes free; returns its path
    /// (delete it to give the space back).
    pub fn fill(&self, leave: u64) -> PathBuf {
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).expect("filler");
        let chunk = vec![0u8; 4096];
        while free_bytes(self.path()) > leave + 4096 {
            if std::io::Write::write_all(&mut file, &chunk).is_err() {
                break;
            }
        }
        path
    }
}

/// Bytes free for an unprivileged writer on the filesystem of `path`.
pub fn free_bytes(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .expect("df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df prints the free bytes")
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        umount(self.dir.path());
    }
}

/// A FUSE pass-through (tests/support/faultfs.py) over a temporary directory.
pub struct FaultFs {
    /// Where the files really are; removed after the mount is gone.
    _root: tempfile::TempDir,
    mount: tempfile::TempDir,
    control: PathBuf,
    child: Child,
}

impl FaultFs {
    pub fn mount() -> FaultFs {
        let root = tempfile::tempdir().expect("root");
        let mount = tempfile::tempdir().expect("mount point");
        let control = root.path().with_extension("faults");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/faultfs.py");
        // Debian's python3, which has python3-fusepy; not whatever python3 is first on PATH.
        let child = Command::new("/usr/bin/python3")
            .arg(script)
            .arg(root.path())
            .arg(mount.path())
            .arg(&control)
            .stdin(Stdio::null())
            .spawn()
            .expect("start faultfs.py (scripts/setup installs python3-fusepy)");
        wait_mounted(mount.path(), true);
        FaultFs {
            _root: root,
            mount,
            control,
            child,
        }
    }

    /// Where to put files that should see the faults.
    pub fn path(&self) -> &Path {
        self.mount.path()
    }

    /// Makes `fsync` and/or `write` fail with EIO from now on ("" for none).
    pub fn fail(&self, faults: &str) {
        std::fs::write(&self.control, faults).expect("write the control file");
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        umount(self.mount.path());
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.control);
    }
}
