-- wrk script: a different token on every request.
-- Arguments (after `--`): a file with one token per line, and the index to start from, so
-- that successive runs continue the cycle instead of replaying tokens the server has cached.
local tokens = {}
local next_index = 0

function init(args)
  for line in io.lines(args[1]) do
    tokens[#tokens + 1] = line
  end
  next_index = tonumber(args[2] or "0") % #tokens
end

function request()
  next_index = next_index % #tokens + 1
  return wrk.format(nil, nil, { ["Authorization"] = "Bearer " .. tokens[next_index] })
end
