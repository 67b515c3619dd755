-- sticky_cookie.lua: sticky sessions from a cookie, falling back to a header.
--
-- Every request that carries the same session lands on the same replica (as long as the
-- ring does not change). The key is the value of the `session` cookie, or else the
-- `X-Session-Id` header. Without either the hook returns nil and the configured
-- `hashing.key` applies (by default `query:id`, or a random id).
--
-- Copy it up into policies/ to activate it; change the two names below to fit your app.

local COOKIE = "session"       -- cookie name (letters, digits, '-' or '_')
local HEADER = "x-session-id"  -- header name, lower-case

-- `name=value` anywhere in the cookie header ('-' escaped: it is magic in Lua patterns).
local PATTERN = ";%s*" .. (COOKIE:gsub("%-", "%%-")) .. "=([^;%s]+)"

function request_key(req)
  local cookies = req.headers.cookie
  if cookies then
    -- `cookie` may hold several pairs, joined with "; ".
    local value = (";" .. cookies):match(PATTERN)
    if value then
      return value
    end
  end
  local header = req.headers[HEADER]
  if header and header ~= "" then
    return header
  end
  return nil
end
