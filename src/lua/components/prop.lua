-- The property-testing module of the sandbox (`prop`): generators, a seeded random source,
-- `prop.check` and shrinking of failing cases to a minimal counterexample.
-- Loaded by components/prop.rs with host hooks: report(table), replay(name), defaults.
local report, replay_for, default_runs, default_seed = ...

local M = {}

-- xorshift64*: deterministic for a seed, independent of math.random.
local function new_rng(seed)
  local s = (seed ~ 0x2545F4914F6CDD1D)
  if s == 0 then s = 0x9E3779B97F4A7C15 end
  local r = {}
  function r.next()
    s = s ~ (s << 13)
    s = s ~ (s >> 7)
    s = s ~ (s << 17)
    return s
  end
  -- uniform integer in [lo, hi]
  function r.int(lo, hi)
    if hi <= lo then return lo end
    local span = hi - lo + 1
    if span <= 0 then -- the range does not fit in 63 bits
      local v = r.next()
      if v < lo then v = lo elseif v > hi then v = hi end
      return v
    end
    return lo + ((r.next() >> 1) % span)
  end
  function r.chance(n) return r.int(1, n) == 1 end
  return r
end

local function is_gen(g) return type(g) == "table" and type(g.gen) == "function" end

local function check_gen(g, where)
  if not is_gen(g) then error(where .. ": expected a generator (prop.int(), prop.string(), ...)", 3) end
end

local function copy(v, depth)
  if type(v) ~= "table" then return v end
  depth = depth or 0
  if depth > 32 then return v end
  local t = {}
  for k, x in pairs(v) do t[k] = copy(x, depth + 1) end
  return t
end

local function clamp(v, lo, hi)
  if v < lo then return lo elseif v > hi then return hi end
  return v
end

-- Integers shrink towards 0 (or the end of the range nearest to it).
function M.int(lo, hi)
  lo = lo or -1000000
  hi = hi or 1000000
  if math.type(lo) ~= "integer" or math.type(hi) ~= "integer" or lo > hi then
    error("prop.int(lo, hi): two integers with lo <= hi", 2)
  end
  local target = clamp(0, lo, hi)
  return {
    kind = "int",
    gen = function(r, size)
      if r.chance(5) then return r.int(lo, hi) end
      local a = clamp(target - size * size, lo, hi)
      local b = clamp(target + size * size, lo, hi)
      return r.int(a, b)
    end,
    shrink = function(v)
      local out = {}
      if v == target then return out end
      out[1] = target
      local sign = v > target and 1 or -1
      local dist = (v - target) * sign
      local h = dist // 2
      while h > 0 do
        out[#out + 1] = v - sign * h
        h = h // 2
      end
      return out
    end,
  }
end

function M.bool()
  return {
    kind = "bool",
    gen = function(r) return r.chance(2) end,
    shrink = function(v) if v then return { false } end return {} end,
  }
end

-- Floats in [lo, hi]; shrink towards 0 and whole numbers.
function M.number(lo, hi)
  lo = lo or -1e6
  hi = hi or 1e6
  local target = clamp(0.0, lo, hi)
  return {
    kind = "number",
    gen = function(r) return lo + (hi - lo) * ((r.next() >> 11) / 9007199254740992.0) end,
    shrink = function(v)
      local out = {}
      if v ~= target then out[#out + 1] = target end
      local w = math.floor(v)
      if w ~= v and w >= lo and w <= hi then out[#out + 1] = w + 0.0 end
      local half = target + (v - target) / 2
      if math.abs(half - target) > 1e-9 then out[#out + 1] = half end
      return out
    end,
  }
end

-- Alphabets: lists of code-point ranges; the first code point is what characters shrink to.
local ALPHABETS = {
  ascii = { { 0x61, 0x7A }, { 0x20, 0x7E } },
  alnum = { { 0x61, 0x7A }, { 0x41, 0x5A }, { 0x30, 0x39 } },
  japanese = {
    { 0x3042, 0x3093 }, -- hiragana あ..ん
    { 0x30A2, 0x30F3 }, -- katakana ア..ン
    { 0x4E00, 0x9FAF }, -- CJK unified ideographs (kanji)
    { 0x30FC, 0x30FC }, -- ー
    { 0x3001, 0x3002 }, -- 、。
    { 0xFF10, 0xFF19 }, -- full-width digits
  },
  unicode = {
    { 0x61, 0x7A }, { 0x20, 0x7E }, { 0xA1, 0x17F }, { 0x3042, 0x3093 }, { 0x30A2, 0x30F3 },
    { 0x4E00, 0x9FAF }, { 0x1F600, 0x1F64F }, { 0x0410, 0x044F },
  },
}

local function alphabet_of(a)
  if a == nil then return ALPHABETS.unicode end
  if type(a) == "string" and ALPHABETS[a] then return ALPHABETS[a] end
  if type(a) == "string" then
    local ranges = {}
    for _, c in utf8.codes(a) do ranges[#ranges + 1] = { c, c } end
    if #ranges == 0 then error("prop.string: an empty alphabet", 3) end
    return ranges
  end
  error("prop.string: alphabet must be 'ascii', 'alnum', 'japanese', 'unicode' or a string of characters", 3)
end

local function encode(cps)
  local parts = {}
  for i = 1, #cps do parts[i] = utf8.char(cps[i]) end
  return table.concat(parts)
end

local function decode(s)
  local cps = {}
  for _, c in utf8.codes(s) do cps[#cps + 1] = c end
  return cps
end

-- Shrink candidates of a sequence: shorter first (halves, then single removals), then
-- simpler elements (via `simpler(i, x)` returning a list of replacements).
local function shrink_seq(items, min, simpler)
  local out = {}
  local n = #items
  if n > min then
    if min == 0 and n > 1 then out[#out + 1] = {} end
    local chunk = n // 2
    while chunk >= 1 do
      if n - chunk >= min then
        for start = 1, n - chunk + 1, chunk do
          local t = {}
          for i = 1, n do if i < start or i >= start + chunk then t[#t + 1] = items[i] end end
          out[#out + 1] = t
        end
      end
      if chunk == 1 then break end
      chunk = chunk // 2
    end
  end
  for i = 1, math.min(n, 64) do
    for _, x in ipairs(simpler(i, items[i])) do
      local t = {}
      for j = 1, n do t[j] = items[j] end
      t[i] = x
      out[#out + 1] = t
    end
  end
  return out
end

function M.string(opts)
  opts = opts or {}
  if type(opts) == "string" then opts = { alphabet = opts } end
  local ranges = alphabet_of(opts.alphabet)
  local min, max = opts.min or 0, opts.max or 64
  if math.type(min) ~= "integer" or math.type(max) ~= "integer" or min < 0 or max < min then
    error("prop.string{min=, max=}: integers with 0 <= min <= max", 2)
  end
  local simplest = ranges[1][1]
  return {
    kind = "string",
    gen = function(r, size)
      local len = r.int(min, clamp(min + size, min, max))
      local cps = {}
      for i = 1, len do
        local rg = ranges[r.int(1, #ranges)]
        cps[i] = r.int(rg[1], rg[2])
      end
      return encode(cps)
    end,
    shrink = function(s)
      local cands = shrink_seq(decode(s), min, function(_, c)
        if c ~= simplest then return { simplest } end
        return {}
      end)
      for i = 1, #cands do cands[i] = encode(cands[i]) end
      return cands
    end,
  }
end

function M.list(elem, opts)
  check_gen(elem, "prop.list(gen)")
  opts = opts or {}
  local min, max = opts.min or 0, opts.max or 32
  return {
    kind = "list",
    gen = function(r, size)
      local len = r.int(min, clamp(min + size // 2, min, max))
      local t = {}
      for i = 1, len do t[i] = elem.gen(r, size) end
      return t
    end,
    shrink = function(items)
      return shrink_seq(items, min, function(_, x)
        local s = elem.shrink(x)
        local firsts = {}
        for k = 1, math.min(#s, 32) do firsts[k] = s[k] end
        return firsts
      end)
    end,
  }
end

-- A table with the given fields, each from its generator.
function M.record(fields)
  if type(fields) ~= "table" then error("prop.record{field = gen, ...}", 2) end
  local keys = {}
  for k, g in pairs(fields) do
    check_gen(g, "prop.record field '" .. tostring(k) .. "'")
    keys[#keys + 1] = k
  end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  return {
    kind = "record",
    gen = function(r, size)
      local t = {}
      for _, k in ipairs(keys) do t[k] = fields[k].gen(r, size) end
      return t
    end,
    shrink = function(v)
      local out = {}
      for _, k in ipairs(keys) do
        for _, x in ipairs(fields[k].shrink(v[k])) do
          local t = {}
          for kk, vv in pairs(v) do t[kk] = vv end
          t[k] = x
          out[#out + 1] = t
        end
      end
      return out
    end,
  }
end

-- Several values at once: the property gets them as separate arguments.
function M.tuple(...)
  local gens = { ... }
  for i, g in ipairs(gens) do check_gen(g, "prop.tuple argument " .. i) end
  local rec = {}
  for i, g in ipairs(gens) do rec[i] = g end
  local r = M.record(rec)
  r.kind = "tuple"
  return r
end

-- One of the given values; shrinks towards the first.
function M.element(values)
  if type(values) ~= "table" or #values == 0 then error("prop.element{v1, v2, ...}: a non-empty list", 2) end
  local index = {}
  for i, v in ipairs(values) do if index[v] == nil then index[v] = i end end
  return {
    kind = "element",
    gen = function(r) return values[r.int(1, #values)] end,
    shrink = function(v)
      local i = index[v]
      if i and i > 1 then return { values[1] } end
      return {}
    end,
  }
end

-- A value from one of the generators; shrinks within it, or to the first generator's simplest.
function M.one_of(...)
  local gens = { ... }
  if #gens == 0 then error("prop.one_of(gen, ...): at least one generator", 2) end
  for i, g in ipairs(gens) do check_gen(g, "prop.one_of argument " .. i) end
  return {
    kind = "one_of",
    gen = function(r, size) return gens[r.int(1, #gens)].gen(r, size) end,
    shrink = function(v)
      local out = {}
      for _, g in ipairs(gens) do
        local ok, s = pcall(g.shrink, v)
        if ok then for _, x in ipairs(s) do out[#out + 1] = x end end
      end
      return out
    end,
  }
end

function M.constant(v)
  return { kind = "constant", gen = function() return v end, shrink = function() return {} end }
end

local function show(v)
  local ok, s = pcall(json.encode, v)
  if ok then return s end
  return tostring(v)
end

-- Run `fn(value)` (tuples: `fn(v1, v2, ...)`); a case fails when it raises or returns false.
local function run_case(gen, fn, v)
  local arg = copy(v)
  local ok, res
  if gen.kind == "tuple" then
    ok, res = pcall(fn, table.unpack(arg, 1, #arg))
  else
    ok, res = pcall(fn, arg)
  end
  if not ok then
    -- The message alone: no "runtime error:" prefix, no host traceback.
    local msg = tostring(res)
    if msg:sub(1, 15) == "runtime error: " then msg = msg:sub(16) end
    local cut = msg:find("\nstack traceback:", 1, true)
    if cut then msg = msg:sub(1, cut - 1) end
    return false, msg
  end
  if res == false then return false, "the property returned false" end
  return true
end

-- prop.check(name, gen, fn [, {runs=, seed=, max_shrinks=}]) -> true, or raises with the
-- shrunk counterexample. Every outcome is reported to the host.
function M.check(name, gen, fn, opts)
  if type(name) ~= "string" then error("prop.check(name, gen, fn [, opts]): name must be a string", 2) end
  check_gen(gen, "prop.check")
  if type(fn) ~= "function" then error("prop.check: the property must be a function", 2) end
  opts = opts or {}
  local runs = opts.runs or default_runs
  local seed = opts.seed or default_seed
  local max_shrinks = opts.max_shrinks or 1000

  local replaying, replay_value = replay_for(name)
  if replaying then
    -- Run the failing case once, unprotected, so a trace shows exactly where it breaks.
    local arg = copy(replay_value)
    local res
    if gen.kind == "tuple" then res = fn(table.unpack(arg, 1, #arg)) else res = fn(arg) end
    if res == false then error("property '" .. name .. "' returned false for " .. show(replay_value), 0) end
    return true
  elseif replaying == false then
    return true -- another property is being replayed
  end

  local r = new_rng(seed)
  for i = 1, runs do
    local size = math.min(i, 100)
    local v = gen.gen(r, size)
    local ok, err = run_case(gen, fn, v)
    if not ok then
      local current, current_err, steps, tries = v, err, 0, 0
      local progress = true
      while progress and steps < max_shrinks and tries < max_shrinks * 20 do
        progress = false
        for _, cand in ipairs(gen.shrink(current)) do
          tries = tries + 1
          local cok, cerr = run_case(gen, fn, cand)
          if not cok then
            current, current_err, steps, progress = cand, cerr, steps + 1, true
            break
          end
          if tries >= max_shrinks * 20 then break end
        end
      end
      report({
        property = name, ok = false, runs = i, seed = seed, shrinks = steps,
        counterexample = current, original = v, error = current_err,
      })
      error(string.format("property '%s' failed after %d run(s) (seed %d); shrunk in %d step(s) to counterexample %s: %s",
        name, i, seed, steps, show(current), current_err), 0)
    end
  end
  report({ property = name, ok = true, runs = runs, seed = seed })
  return true
end

-- Draw one value (for examples and debugging).
function M.sample(gen, seed, size)
  check_gen(gen, "prop.sample")
  return gen.gen(new_rng(seed or default_seed), size or 30)
end

return M
