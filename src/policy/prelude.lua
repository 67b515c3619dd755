-- The trusted prelude of every policy state (see sandbox.rs). It runs before any policy file,
-- with the `debug` library still open: it keeps the four debug functions `seal` needs in
-- locals and removes the library from the environment before any policy code can run.
--
-- It owns the Lua side of the sandbox:
--  * pcall/xpcall re-raise a spent budget or a passed deadline (a policy cannot catch them);
--  * load takes text chunks only, of at most MAX_CHUNK bytes (compiling is one C call);
--  * the table functions that loop inside one C call run in Lua past SHIFT elements, where the
--    count hook sees every step; string.pack refuses formats that ask for huge paddings;
--  * state rules (DESIGN.md "Security defaults"): `seal`, called once the files have run,
--    moves the globals into a hidden base table and makes every table reachable from it
--    read-only; each call then writes its globals into the (empty) global table, which the
--    gateway clears after the call.
-- The arguments: `interrupted()` (true once the current call ran out of budget or time),
-- `log(line)` (the debug log) and `note_global_write()` (a call wrote a global).

local interrupted, log, note_global_write = ...

local G = _G
local error, select, tostring, type, tonumber, ipairs = error, select, tostring, type, tonumber, ipairs
local raw_next, raw_rawget, raw_rawset, raw_rawlen, raw_rawequal = next, rawget, rawset, rawlen, rawequal
local raw_setmetatable = setmetatable
local raw_pcall, raw_xpcall, raw_load, raw_collect = pcall, xpcall, load, collectgarbage
local concat, pack = table.concat, table.pack
local tointeger, maxinteger = math.tointeger, math.maxinteger
local gmatch = string.gmatch
local dbg_getupvalue, dbg_getinfo = debug.getupvalue, debug.getinfo
local dbg_getmetatable, dbg_setmetatable = debug.getmetatable, debug.setmetatable
local raw_dump = string.dump

debug = nil
string.dump = nil
dofile, loadfile, warn = nil, nil, nil

-- Functions of this prelude: `seal` neither scans nor freezes what they hold.
local trusted = {}
local function trust(f)
  trusted[f] = true
  return f
end

-- A spent budget or a passed deadline is not catchable: re-raise it past pcall/xpcall.
local function pass(ok, ...)
  if not ok and interrupted() then error((...), 0) end
  return ok, ...
end
pcall = trust(function(f, ...) return pass(raw_pcall(f, ...)) end)
xpcall = trust(function(f, handler, ...) return pass(raw_xpcall(f, handler, ...)) end)

-- Text chunks only, never bytecode; compiling one is a single C call, so its size is capped.
local MAX_CHUNK = 65536
local TOO_BIG = "load: a chunk may have at most " .. MAX_CHUNK .. " bytes in a policy"
load = trust(function(chunk, name, _mode, ...)
  if type(chunk) == 'string' then
    if #chunk > MAX_CHUNK then return nil, TOO_BIG end
  elseif type(chunk) == 'function' then
    local read, total = chunk, 0
    chunk = function()
      local piece = read()
      if type(piece) == 'string' then
        total = total + #piece
        if total > MAX_CHUNK then error(TOO_BIG, 0) end
      end
      return piece
    end
  end
  if select('#', ...) > 0 then return raw_load(chunk, name, 't', ...) end
  return raw_load(chunk, name, 't')
end)

collectgarbage = trust(function(opt)
  if opt == 'count' then return raw_collect('count') end
  error("collectgarbage: only collectgarbage('count') is available to policies", 2)
end)

print = trust(function(...)
  local t = pack(...)
  for k = 1, t.n do t[k] = tostring(t[k]) end
  log(concat(t, '\t', 1, t.n))
end)

-- Table functions. In C they loop inside one call, out of the count hook's sight; from SHIFT
-- elements on they run in Lua instead (the C versions stay for the common small cases).
local SHIFT = 1024
local raw_insert, raw_remove, raw_move = table.insert, table.remove, table.move
local raw_concat, raw_sort = table.concat, table.sort

table.insert = trust(function(t, ...)
  if select('#', ...) == 2 and type(t) == 'table' then
    local pos, value = ...
    pos = tointeger(pos)
    local e = #t + 1
    if pos and pos >= 1 and pos <= e and e - pos > SHIFT then
      for i = e, pos + 1, -1 do t[i] = t[i - 1] end
      t[pos] = value
      return
    end
  end
  return raw_insert(t, ...)
end)

table.remove = trust(function(t, ...)
  if select('#', ...) > 0 and type(t) == 'table' then
    local size, pos = #t, tointeger((...))
    if pos and pos >= 1 and size - pos > SHIFT then
      local value = t[pos]
      for i = pos, size - 1 do t[i] = t[i + 1] end
      t[size] = nil
      return value
    end
  end
  return raw_remove(t, ...)
end)

table.move = trust(function(a1, f, e, t, a2)
  local fi, ei, ti = tointeger(f), tointeger(e), tointeger(t)
  if fi and ei and ti and ei >= fi and (ei + 0.0) - fi >= SHIFT then
    if a2 == nil then a2 = a1 end
    if not (fi > 0 or ei < maxinteger + fi) then
      error("bad argument #3 to 'move' (too many elements to move)", 2)
    end
    local n = ei - fi + 1
    if not (ti <= maxinteger - n + 1) then
      error("bad argument #4 to 'move' (destination wrap around)", 2)
    end
    if ti > ei or ti <= fi or a1 ~= a2 then
      for i = 0, n - 1 do a2[ti + i] = a1[fi + i] end
    else
      for i = n - 1, 0, -1 do a2[ti + i] = a1[fi + i] end
    end
    return a2
  end
  return raw_move(a1, f, e, t, a2)
end)

local CONCAT_PIECE = 4 * SHIFT
table.concat = trust(function(t, sep, i, j)
  if type(t) == 'table' then
    local first = (i == nil) and 1 or tointeger(i)
    local last = (j == nil) and #t or tointeger(j)
    if first and last and (last + 0.0) - first >= CONCAT_PIECE then
      local parts, n = {}, 0
      for lo = first, last, CONCAT_PIECE do
        local hi = lo + (CONCAT_PIECE - 1)
        if hi > last or hi < lo then hi = last end
        n = n + 1
        parts[n] = raw_concat(t, sep, lo, hi)
      end
      return raw_concat(parts, sep)
    end
  end
  return raw_concat(t, sep, i, j)
end)

-- With a Lua comparison every step of the sort runs Lua code, which the count hook sees.
local function less(a, b) return a < b end
table.sort = trust(function(t, comp)
  if comp == nil and type(t) == 'table' and #t > 256 then comp = less end
  return raw_sort(t, comp)
end)

local raw_pack = string.pack
local MAX_PACK = 1000000
string.pack = trust(function(fmt, ...)
  if type(fmt) == 'string' then
    local total = 0
    for digits in gmatch(fmt, '%d+') do
      total = total + (tonumber(digits) or 0)
      if total > MAX_PACK then
        error("string.pack: the format asks for more than " .. MAX_PACK .. " bytes", 2)
      end
    end
  end
  return raw_pack(fmt, ...)
end)

-- State rules. `shadow[t]` holds the contents of the frozen table t, which is left empty with
-- a metatable that reads from the shadow and refuses writes.
local shadow = {}
local views = {}

local READ_ONLY = "module-level tables are read-only in hooks (defined at load, shared by "
  .. "every request); keep per-request data in locals"
local function read_only() error(READ_ONLY, 2) end
local function frozen_next(t, k) return raw_next(shadow[t], k) end
local function frozen_pairs(t) return frozen_next, t, nil end

-- The metatable an object gets when a frozen table is set as its metatable: the VM reads
-- metamethods raw, so it gets a raw copy, hidden behind __metatable (getmetatable returns the
-- frozen table itself, and the copy can never be changed).
local function view_of(frozen)
  local v = views[frozen]
  if v == nil then
    v = {}
    for k, x in raw_next, shadow[frozen] do
      if k ~= '__gc' then v[k] = x end
    end
    if raw_rawget(v, '__metatable') == nil then v.__metatable = frozen end
    views[frozen] = v
  end
  return v
end

setmetatable = trust(function(t, mt)
  if raw_rawequal(t, G) then
    error("setmetatable: the metatable of the global table belongs to the sandbox", 2)
  end
  if type(mt) == 'table' then
    if shadow[mt] then
      mt = view_of(mt)
    elseif raw_rawget(mt, '__gc') ~= nil then
      error("setmetatable: __gc (finalizers) is not available to policies", 2)
    end
  end
  return raw_setmetatable(t, mt)
end)

rawset = trust(function(t, k, v)
  if shadow[t] then error(READ_ONLY, 2) end
  if raw_rawequal(t, G) then note_global_write() end
  return raw_rawset(t, k, v)
end)
rawget = trust(function(t, k)
  local s = shadow[t]
  if s then return raw_rawget(s, k) end
  return raw_rawget(t, k)
end)
rawlen = trust(function(t)
  local s = shadow[t]
  if s then return raw_rawlen(s) end
  return raw_rawlen(t)
end)
next = trust(function(t, k)
  local s = shadow[t]
  if s then return raw_next(s, k) end
  return raw_next(t, k)
end)

-- Freezes every table reachable from the globals, checks with `scan` (Rust: a string.dump ->
-- nil or source, line, name) that no reachable function assigns to an upvalue, and turns the
-- global table into a per-call scratch space. Returns nil, or the first such assignment.
local function seal(scan)
  local base = {}
  for k, v in raw_next, G do base[k] = v end
  for k in raw_next, base do raw_rawset(G, k, nil) end

  local string_mt = dbg_getmetatable("")
  local public_string_mt = {}
  for k, v in raw_next, string_mt do public_string_mt[k] = v end

  local seen = {[G] = true, [base] = true, [string_mt] = true}
  for f in raw_next, trusted do seen[f] = true end
  local queue, queued = {}, 0
  local function push(v)
    local tv = type(v)
    if (tv == 'table' or tv == 'function') and not seen[v] then
      seen[v] = true
      queued = queued + 1
      queue[queued] = v
    end
  end
  for k, v in raw_next, base do push(k) push(v) end
  push(public_string_mt)

  local tables, done = {}, 0
  while done < queued do
    done = done + 1
    local v = queue[done]
    queue[done] = nil
    if type(v) == 'table' then
      tables[#tables + 1] = v
      for k, x in raw_next, v do push(k) push(x) end
      push(dbg_getmetatable(v))
    elseif dbg_getinfo(v, 'S').what ~= 'C' then
      local source, line, name = scan(raw_dump(v))
      if source then return source, line, name end
      local i = 1
      while true do
        local upname, x = dbg_getupvalue(v, i)
        if upname == nil then break end
        push(x)
        i = i + 1
      end
    end
  end

  local original = {}
  for _, t in ipairs(tables) do
    local contents = {}
    for k, v in raw_next, t do contents[k] = v end
    for k in raw_next, contents do raw_rawset(t, k, nil) end
    original[t] = dbg_getmetatable(t) or false
    shadow[t] = contents
  end
  for _, t in ipairs(tables) do
    local contents, om = shadow[t], original[t]
    local oms = om and (shadow[om] or om) or {}
    local mt = {}
    for k, v in raw_next, oms do mt[k] = v end
    mt.__gc, mt.__mode = nil, nil
    mt.__newindex = read_only
    local index = raw_rawget(oms, '__index')
    if index == nil then
      mt.__index = contents
    else
      mt.__index = function(_, k)
        local v = contents[k]
        if v ~= nil then return v end
        if type(index) == 'function' then return index(t, k) end
        return index[k]
      end
    end
    if raw_rawget(oms, '__len') == nil then mt.__len = function() return #contents end end
    if raw_rawget(oms, '__pairs') == nil then mt.__pairs = frozen_pairs end
    if raw_rawget(oms, '__metatable') == nil then mt.__metatable = om end
    dbg_setmetatable(t, mt)
  end

  -- Strings keep their raw metatable (the VM reads it raw), reading from the frozen string
  -- library's contents; getmetatable("") shows a frozen copy.
  local index = raw_rawget(string_mt, '__index')
  if shadow[index] then raw_rawset(string_mt, '__index', shadow[index]) end
  raw_rawset(string_mt, '__metatable', public_string_mt)

  dbg_setmetatable(G, {
    __index = base,
    __newindex = function(t, k, v)
      note_global_write()
      raw_rawset(t, k, v)
    end,
    __metatable = false,
  })
  return nil
end

return seal
