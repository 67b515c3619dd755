-- spread_hash.lua: a well-spread request hash.
--
-- The built-in H(i) = i^2 + 2i + 17 (mod slots) is a quadratic: with a power-of-two slot
-- count it only ever reaches a small fraction of the slots, so most of the ring is never
-- used and some slots get several times their share of keys. This replaces it with the
-- MurmurHash3 64-bit finalizer (fmix64), which makes every bit of `i` affect every bit of
-- the result, then reduces it to a slot.
--
-- Copy it up into policies/ to activate it. Pair it with spread_vnodes.lua.

-- Lua 5.4 integers are 64-bit and wrap on overflow; hex literals that overflow wrap too,
-- and `>>` is a logical shift, so this is exactly the C fmix64.
local function fmix64(k)
  k = k ~ (k >> 33)
  k = k * 0xff51afd7ed558ccd
  k = k ~ (k >> 33)
  k = k * 0xc4ceb9fe1a85ec53
  k = k ~ (k >> 33)
  return k
end

-- `k` read as an unsigned 64-bit value, modulo n (n > 0): `%` alone would treat k as signed.
local function umod(k, n)
  return (((k >> 1) % n) * 2 + (k & 1)) % n
end

function request_hash(i, slots)
  return umod(fmix64(i), slots)
end
