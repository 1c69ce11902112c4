-- wrk script: POST the body in $BENCH_BODY with $BENCH_AUTH, count requests sent.
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then wrk.headers["Authorization"] = "Bearer " .. auth end

local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) sent = 0 end
function request() sent = sent + 1; return wrk.format() end
function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do total = total + t:get("sent") end
  io.write(string.format("SENT %d\n", total))
  io.write(string.format("P50 %.1f\nP99 %.1f\n", latency:percentile(50), latency:percentile(99)))
end
