-- The trusted prelude of every policy state (see sandbox.rs). It runs before any policy file,
-- with the `debug` library still open: it keeps the four debug functions `seal` needs in
-- locals and removes the library from the environment before any policy code can run.
--
-- It owns the Lua side of the sandbox:
--  * pcall/xpcall re-raise a spent budget or a passed deadline (a policy cannot catch them),
--    and a policy's message handler never runs once the call is stopped (Lua calls it from
--    inside the count hook, where hooks are off: it would run unmetered);
--  * no value can have a __close metamethod (setmetatable gives an object a copy of the
--    metatable that only the sandbox holds, refused when it has __close or __gc), and load
--    refuses chunks that declare to-be-closed variables: Lua runs __close while unwinding,
--    where the hook may not reach it;
--  * load takes text chunks only, of at most MAX_CHUNK bytes (compiling is one C call);
--  * the table functions that loop inside one C call run in Lua past SHIFT elements, where the
--    count hook sees every step; table.sort's comparison is always Lua code;
--  * the C functions whose work grows with their input charge the meter for it before they
--    run and refuse inputs past C_CAP steps (the inventory is in docs/policies.md);
--  * math.randomseed is refused, and the generator is reseeded after every call that used it,
--    so no call sees a sequence another call chose;
--  * state rules (DESIGN.md "Security defaults"): `seal`, called once the files have run,
--    moves the globals into a hidden base table and makes every table reachable from it
--    read-only; each call then writes its globals into the (empty) global table, which the
--    gateway clears after the call.
-- The arguments: `interrupted()` (true once the current call ran out of budget or time),
-- `log(line)` (the debug log), `note_global_write()` (a call wrote a global), `charge(steps)`
-- (spends steps of the call's meter; raises once the call is stopped), `closable(dump)` (the
-- line of the first to-be-closed variable in a binary chunk, or nil) and `note_random()`
-- (a call used math.random). It returns `seal` and `reseed`.

local interrupted, log, note_global_write, charge, closable, note_random = ...

local G = _G
local error, select, tostring, type, tonumber, ipairs = error, select, tostring, type, tonumber, ipairs
local raw_next, raw_rawget, raw_rawset, raw_rawlen, raw_rawequal = next, rawget, rawset, rawlen, rawequal
local raw_setmetatable = setmetatable
local raw_pcall, raw_xpcall, raw_load, raw_collect = pcall, xpcall, load, collectgarbage
local concat, pack = table.concat, table.pack
local tointeger, maxinteger, floor = math.tointeger, math.maxinteger, math.floor
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
-- Lua calls the message handler where the error is raised; for a stopped call that is inside
-- the count hook, where hooks are off, so the policy's handler would run unmetered (a loop in
-- it held its thread for good). Once the call is stopped the handler is skipped; for any other
-- error it runs as ordinary, metered code.
xpcall = trust(function(f, handler, ...)
  local h = handler
  if type(handler) == 'function' then
    h = function(e)
      if interrupted() then return e end
      return handler(e)
    end
  end
  return pass(raw_xpcall(f, h, ...))
end)

-- C functions whose work grows with their input: `cost(name, steps)` refuses more than C_CAP
-- steps for one call (about a quarter of a millisecond of C work) and charges the meter past
-- C_FREE, so a loop of such calls is stopped by the budget or the deadline like a loop of
-- instructions. A step is about one VM instruction's time (a few ns).
local C_FREE, C_CAP = 1024, 262144
local function cost(name, steps)
  if steps > C_CAP then
    error(name .. ": this call would do about " .. floor(steps) .. " steps of work in one C call, "
      .. "more than the " .. C_CAP .. " a policy may (split the input)", 3)
  end
  if steps > C_FREE then charge(steps) end
end
-- Steps per byte a C function scans, per byte `%q` quotes, per value it pushes or takes as
-- an argument (measured: pushing values grows the stack, which the collector then traverses),
-- and per byte load compiles.
local PER_BYTE, PER_QUOTED, PER_VALUE, PER_SOURCE = 1, 16, 16, 2

-- `posrelat` of lstrlib.c and lutf8lib.c: a 1-based position, negative from the end.
local function position(pos, len)
  if pos >= 0 then return pos end
  if -pos > len then return 0 end
  return len + pos + 1
end
-- In floats: a span of huge positions must not wrap around when it is weighed.
local function span(i, j) if j < i then return 0 end return (j + 0.0) - i + 1 end

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
  if type(chunk) == 'string' then cost('load', #chunk * PER_SOURCE) end
  local f, err
  if select('#', ...) > 0 then f, err = raw_load(chunk, name, 't', ...)
  else f, err = raw_load(chunk, name, 't') end
  if f then
    local line = closable(raw_dump(f))
    if line then
      return nil, "load: line " .. line .. ": to-be-closed variables (<close>) are not "
        .. "available to policies"
    end
  end
  return f, err
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

-- With a Lua comparison every step of the sort runs Lua code, which the count hook sees; a C
-- comparison (math.ult, rawequal) would sort a large table inside one C call. Between two
-- comparisons the sort does constant work.
local function less(a, b) return a < b end
table.sort = trust(function(t, comp)
  if comp == nil then
    if type(t) == 'table' and #t > 256 then comp = less end
  elseif type(comp) == 'function' then
    local c = comp
    comp = function(a, b) return c(a, b) end
  end
  return raw_sort(t, comp)
end)

local raw_unpack, raw_tpack = table.unpack, table.pack
table.unpack = trust(function(t, i, j)
  if type(t) == 'table' then
    local first = (i == nil) and 1 or tointeger(i)
    local last = (j == nil) and #t or tointeger(j)
    if first and last then cost('table.unpack', span(first, last) * PER_VALUE) end
  end
  return raw_unpack(t, i, j)
end)
table.pack = trust(function(...)
  cost('table.pack', select('#', ...) * PER_VALUE)
  return raw_tpack(...)
end)

-- Strings.
local raw_byte, raw_char, raw_upper, raw_lower, raw_reverse, raw_format =
  string.byte, string.char, string.upper, string.lower, string.reverse, string.format
local raw_unpack_string, raw_packsize = string.unpack, string.packsize
local find = string.find

-- The bytes a string argument has (a number's text is short; any other value makes the C
-- function raise its own argument error).
local function length(s)
  if type(s) == 'string' then return #s end
  return 0
end

string.byte = trust(function(s, i, j)
  if type(s) == 'string' then
    local first = tointeger(i == nil and 1 or i)
    local last = (j == nil) and first or tointeger(j)
    if first and last then
      local len = #s
      first, last = position(first, len), position(last, len)
      if first < 1 then first = 1 end
      if last > len then last = len end
      cost('string.byte', span(first, last) * PER_VALUE)
    end
  end
  return raw_byte(s, i, j)
end)
string.char = trust(function(...)
  cost('string.char', select('#', ...) * PER_VALUE)
  return raw_char(...)
end)
string.upper = trust(function(s)
  cost('string.upper', length(s) * PER_BYTE)
  return raw_upper(s)
end)
string.lower = trust(function(s)
  cost('string.lower', length(s) * PER_BYTE)
  return raw_lower(s)
end)
string.reverse = trust(function(s)
  cost('string.reverse', length(s) * PER_BYTE)
  return raw_reverse(s)
end)
string.format = trust(function(fmt, ...)
  if type(fmt) == 'string' then
    local bytes = #fmt
    local n = select('#', ...)
    if n > 0 then
      local args = pack(...)
      for k = 1, n do
        local a = args[k]
        if type(a) == 'string' then bytes = bytes + #a end
      end
    end
    local weight = PER_BYTE
    if find(fmt, 'q', 1, true) then weight = PER_QUOTED end
    cost('string.format', bytes * weight + n * PER_VALUE)
  end
  return raw_format(fmt, ...)
end)
string.unpack = trust(function(fmt, s, ...)
  if type(fmt) == 'string' then cost('string.unpack', #fmt * PER_VALUE) end
  return raw_unpack_string(fmt, s, ...)
end)
string.packsize = trust(function(fmt)
  cost('string.packsize', length(fmt) * PER_BYTE)
  return raw_packsize(fmt)
end)

-- (`tonumber` is also a local above, kept raw: this replaces the global.)
local raw_tonumber = tonumber
G.tonumber = trust(function(v, ...)
  if type(v) == 'string' then cost('tonumber', #v * PER_BYTE) end
  return raw_tonumber(v, ...)
end)

-- UTF-8: positions as lutf8lib.c reads them.
local raw_ulen, raw_codepoint, raw_offset, raw_uchar = utf8.len, utf8.codepoint, utf8.offset, utf8.char
utf8.len = trust(function(s, i, j, lax)
  if type(s) == 'string' then
    local len = #s
    local first = tointeger(i == nil and 1 or i)
    local last = tointeger(j == nil and -1 or j)
    if first and last then
      cost('utf8.len', span(position(first, len), position(last, len)) * PER_BYTE)
    end
  end
  return raw_ulen(s, i, j, lax)
end)
utf8.codepoint = trust(function(s, i, j, lax)
  if type(s) == 'string' then
    local len = #s
    local first = tointeger(i == nil and 1 or i)
    local last = (j == nil) and first or tointeger(j)
    if first and last then
      -- each value is both decoded and pushed
      cost('utf8.codepoint', span(position(first, len), position(last, len)) * PER_VALUE)
    end
  end
  return raw_codepoint(s, i, j, lax)
end)
utf8.offset = trust(function(s, n, i)
  -- it may scan the whole string (a run of continuation bytes is skipped in one step)
  cost('utf8.offset', length(s) * PER_BYTE)
  return raw_offset(s, n, i)
end)
utf8.char = trust(function(...)
  cost('utf8.char', select('#', ...) * PER_VALUE)
  return raw_uchar(...)
end)

-- The generator's state would carry data from one call to the next: randomseed is refused,
-- and a call that drew numbers makes the gateway reseed it (`reseed`) before the next one.
local raw_random, raw_randomseed = math.random, math.randomseed
local random_used = false
math.random = trust(function(...)
  if not random_used then
    random_used = true
    note_random()
  end
  return raw_random(...)
end)
math.randomseed = trust(function()
  error("math.randomseed is not available to policies (one request could pass data to the "
    .. "next through the generator); math.random is seeded by the gateway", 2)
end)
local function reseed(a, b)
  raw_randomseed(a, b)
  random_used = false
end

local raw_pack = string.pack
local MAX_PACK = 1000000
string.pack = trust(function(fmt, ...)
  if type(fmt) == 'string' then
    cost('string.pack', #fmt * PER_VALUE + select('#', ...) * PER_VALUE)
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
      if k ~= '__gc' and k ~= '__close' then v[k] = x end
    end
    if raw_rawget(v, '__metatable') == nil then v.__metatable = frozen end
    views[frozen] = v
  end
  return v
end

-- The metatable the VM reads for an object is a copy only the sandbox holds, taken when
-- setmetatable is called, so no code can add __close (or __gc) to it later; `copies` maps a
-- copy back to the table the policy passed, which is what getmetatable shows.
local copies = raw_setmetatable({}, {__mode = 'k'})
local raw_getmetatable = getmetatable
local function refuse_metamethods(source)
  if raw_rawget(source, '__gc') ~= nil then
    error("setmetatable: __gc (finalizers) is not available to policies", 3)
  end
  if raw_rawget(source, '__close') ~= nil then
    error("setmetatable: __close (to-be-closed values) is not available to policies", 3)
  end
end
setmetatable = trust(function(t, mt)
  if raw_rawequal(t, G) then
    error("setmetatable: the metatable of the global table belongs to the sandbox", 2)
  end
  if type(mt) == 'table' then
    local frozen = shadow[mt]
    if frozen then
      refuse_metamethods(frozen)
      mt = view_of(mt)
    else
      refuse_metamethods(mt)
      local copy = {}
      for k, v in raw_next, mt do copy[k] = v end
      copies[copy] = mt
      mt = copy
    end
  end
  return raw_setmetatable(t, mt)
end)
getmetatable = trust(function(v)
  local mt = raw_getmetatable(v)
  local original = copies[mt]
  if original ~= nil then return original end
  return mt
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
    mt.__gc, mt.__mode, mt.__close = nil, nil, nil
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
    if raw_rawget(oms, '__metatable') == nil then mt.__metatable = om and (copies[om] or om) end
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

return seal, reseed
