-- wrk script for bench/serve_wrk.py: POST encoded images to an imgclf server, one image per request.
--
--   wrk -t1 -c32 -d20s -s bench/serve_wrk.lua http://127.0.0.1:8000/predict -- LIST [raw|multipart] [OUT.json] [close]
--
-- LIST is a text file naming the image files (one path a line); requests cycle through them. raw sends the
-- bytes as the body (Content-Type image/png or image/jpeg from the file name); multipart sends one file part.
-- close: every request asks for Connection: close (a new connection per request, like many one-shot clients).
-- At the end, a JSON summary (requests, status counts, latency percentiles in microseconds) goes to OUT.json.

local requests_ = {}
local n_, i_ = 0, 0
out_path = nil  -- global: done() runs in another Lua state and reads it through thread:get
counts = {}  -- global: done() reads every thread's through thread:get
local threads_ = {}

local function read_file(path)
  local f = assert(io.open(path, "rb"), "cannot open " .. path)
  local data = f:read("*all")
  f:close()
  return data
end

local function ctype(path)
  if path:match("%.jpe?g$") then return "image/jpeg" end
  return "image/png"
end

function setup(thread)
  table.insert(threads_, thread)
end

function init(args)
  local list, mode = args[1], args[2] or "raw"
  out_path = args[3]
  local close = args[4] == "close"
  for path in io.lines(list) do
    if #path > 0 then
      local body, headers = read_file(path), {}
      if mode == "multipart" then
        local b = "imgclfwrkboundary7d1f"
        body = "--" .. b .. "\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" .. path:match("[^/]+$")
          .. "\"\r\nContent-Type: " .. ctype(path) .. "\r\n\r\n" .. body .. "\r\n--" .. b .. "--\r\n"
        headers["Content-Type"] = "multipart/form-data; boundary=" .. b
      else
        headers["Content-Type"] = ctype(path)
      end
      if close then headers["Connection"] = "close" end
      n_ = n_ + 1
      requests_[n_] = wrk.format("POST", nil, headers, body)
    end
  end
  assert(n_ > 0, "no images listed in " .. list)
  i_ = math.random(n_) - 1  -- threads start at different images
end

function request()
  i_ = (i_ % n_) + 1
  return requests_[i_]
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end

function done(summary, latency, requests)
  local status = {}
  for _, t in ipairs(threads_) do
    for code, n in pairs(t:get("counts")) do
      status[tostring(code)] = (status[tostring(code)] or 0) + n
    end
  end
  local parts = {}
  for code, n in pairs(status) do table.insert(parts, string.format('"%s": %d', code, n)) end
  local pct = {}
  for _, p in ipairs({50, 90, 99}) do table.insert(pct, string.format('"p%d": %d', p, latency:percentile(p))) end
  local e = summary.errors
  local doc = string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "status": {%s}, "latency_us": {%s, "mean": %.1f, "max": %d}, '
      .. '"socket_errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}}\n',
    summary.requests, summary.duration, summary.bytes, table.concat(parts, ", "), table.concat(pct, ", "),
    latency.mean, latency.max, e.connect, e.read, e.write, e.timeout)
  local out = threads_[1]:get("out_path")
  if out then
    local f = assert(io.open(out, "w"))
    f:write(doc)
    f:close()
  else
    io.write(doc)
  end
end
