-- spread_vnodes.lua: a virtual-node placement that matches spread_hash.lua.
--
-- The built-in Phi(i, j) = i^2 + j^2 + 2j + 25 (mod slots) puts the virtual nodes of
-- servers with nearby ids next to each other and leaves long arcs of the ring to a single
-- server. This places virtual node j of server i at fmix64(fmix64(i) + j * golden), so each
-- server's nodes are scattered independently over the whole ring.
--
-- Called on every ring rebuild (not per request). Copy it up into policies/ to activate it.

local function fmix64(k)
  k = k ~ (k >> 33)
  k = k * 0xff51afd7ed558ccd
  k = k ~ (k >> 33)
  k = k * 0xc4ceb9fe1a85ec53
  k = k ~ (k >> 33)
  return k
end

local function umod(k, n)
  return (((k >> 1) % n) * 2 + (k & 1)) % n
end

local GOLDEN = 0x9e3779b97f4a7c15 -- 2^64 / phi: spreads consecutive j apart

function vnode_hash(i, j, slots)
  return umod(fmix64(fmix64(i) + (j + 1) * GOLDEN), slots)
end
