-- wrk script: POSTs a mix of Flashduty custom-action payloads (4.4 KB and 2.3 KB), each with a
-- unique event_id (run nonce + wrk thread + counter), and the secret header actiongate wants.
local dir = os.getenv("FIXTURES") or "tests/fixtures"
local full = io.open(dir .. "/custom_action_full.json"):read("*a")
local manual = io.open(dir .. "/custom_action_manual.json"):read("*a")
-- Pad the manual incident to ~2.3 KB with an unknown field (forwarded untouched).
manual = manual:gsub('"event_type"', '"padding": "' .. string.rep("x", 1000) .. '",\n  "event_type"', 1)
local nonce = os.getenv("RUN_NONCE") or tostring(os.time())
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local n = 0
local headers = { ["Content-Type"] = "application/json", ["X-Actiongate-Secret"] = os.getenv("SECRET") or "bench-secret" }

-- CLOSE=1: a new connection for every request (what a flood of refused requests costs).
if os.getenv("CLOSE") == "1" then headers["Connection"] = "close" end

request = function()
  n = n + 1
  local id = nonce .. "-" .. tostring(tid) .. "-" .. tostring(n)
  local body
  if n % 2 == 0 then
    body = full:gsub("3f9c2b7a51e04d8c9a6b0e1f2d3c4b5a", id, 1)
  else
    body = manual:gsub("c0ffee00c0ffee00c0ffee00c0ffee01", id, 1)
  end
  return wrk.format("POST", nil, headers, body)
end

-- With DELAY_MS set, each connection waits that long before its next request: a paced load
-- (connections x 1000 / DELAY_MS requests/s at most) that measures latency below saturation.
local pace = tonumber(os.getenv("DELAY_MS") or "0")
if pace > 0 then
  delay = function()
    return pace
  end
end

-- With LIMIT set (requests per thread), a thread stops once it has sent that many: the
-- backlog phase fills the spool with an exact count instead of a duration's worth.
local limit = tonumber(os.getenv("LIMIT") or "0")
if limit > 0 then
  response = function()
    if n >= limit then
      wrk.thread:stop()
    end
  end
end
