-- reader_lib: the reader app's shared code. Other functions take it with
-- `local R = fn.call('reader_lib', {})` (same sandbox, same caller); it runs nothing itself.
--
-- Everything runs as the calling user: rows through the my_reader_* policy views, preference
-- notes under the user's own file area (file.md), models through ai.* (the privacy guard
-- redacts codes and secrets from every prompt), outside calls through http.* under the
-- [egress.functions."reader_*"] policy.
local M = {}

-- The dashboard (TSX + Tailwind), deployed to the user's canvas with the day's picks as props.
M.DASHBOARD = [==[@include ui/dashboard.tsx]==]

M.LIKES, M.DISLIKES = 'reader/likes.md', 'reader/dislikes.md'
M.MAX_ITEMS = 40 -- most items ranked in one day

-- Note: the sandbox refuses pattern calls whose backtracking could run long on big subjects,
-- so feed bodies are cut with plain finds; patterns run only on short pieces.

local function clip(s, n)
  s = tostring(s or '')
  if #s <= n then return s end
  -- cut on a UTF-8 boundary
  local i = n
  while i > 0 and (s:byte(i + 1) or 0) & 0xC0 == 0x80 do i = i - 1 end
  return s:sub(1, i) .. '…'
end
M.clip = clip

local function trim(s)
  s = tostring(s or '')
  local a = s:find('%S')
  if not a then return '' end
  local b = #s
  while b > a and s:sub(b, b):find('%s') do b = b - 1 end
  return s:sub(a, b)
end
M.trim = trim

local ENTITIES = {amp = '&', lt = '<', gt = '>', quot = '"', apos = "'", nbsp = ' '}
-- Entities decoded with plain finds (no backtracking pattern over the whole text).
local function unescape(s)
  if not s:find('&', 1, true) then return s end
  local out, i = {}, 1
  while true do
    local a = s:find('&', i, true)
    if not a then out[#out + 1] = s:sub(i); break end
    out[#out + 1] = s:sub(i, a - 1)
    local b = s:find(';', a + 1, true)
    local e = b and b - a <= 10 and s:sub(a + 1, b - 1) or nil
    local rep
    if e and e:sub(1, 2) == '#x' then
      local n = tonumber(e:sub(3), 16)
      rep = n and n < 0x110000 and utf8.char(n) or nil
    elseif e and e:sub(1, 1) == '#' then
      local n = tonumber(e:sub(2))
      rep = n and n < 0x110000 and utf8.char(n) or nil
    elseif e then
      rep = ENTITIES[e]
    end
    if rep then
      out[#out + 1] = rep
      i = b + 1
    else
      out[#out + 1] = '&'
      i = a + 1
    end
  end
  return table.concat(out)
end

-- Text of an XML/HTML fragment: CDATA unwrapped, tags dropped, entities decoded, spaces folded.
local function text_of(s, limit)
  s = trim(s or '')
  if s:sub(1, 9) == '<![CDATA[' and s:sub(-3) == ']]>' then s = s:sub(10, -4) end
  s = clip(s, limit + 400)
  s = s:gsub('<[^>]*>', ' ')
  s = unescape(unescape(s)) -- feeds often escape their HTML twice
  s = s:gsub('<[^>]*>', ' '):gsub('%s+', ' ')
  return clip(trim(s), limit)
end
M.text_of = text_of

-- The first element `name` at or after `init`: content, opening tag, position after it.
local function element(s, name, init)
  local i = init or 1
  while true do
    local a = s:find('<' .. name, i, true)
    if not a then return nil end
    local c = s:sub(a + #name + 1, a + #name + 1)
    if c == '>' or c == '/' or c == ' ' or c == '\t' or c == '\n' or c == '\r' then
      local gt = s:find('>', a, true)
      if not gt then return nil end
      local open = s:sub(a, gt)
      if open:sub(-2) == '/>' then return '', open, gt + 1 end
      local close = s:find('</' .. name .. '>', gt, true)
      if not close then return nil end
      return s:sub(gt + 1, close - 1), open, close + #name + 3
    end
    i = a + 1
  end
end

-- The value of attribute `name` in an opening tag (name="v" or name='v').
local function attr(open, name)
  for _, q in ipairs({'"', "'"}) do
    local key, i = name .. '=' .. q, 1
    while true do
      local a = open:find(key, i, true)
      if not a then break end
      local before = open:sub(a - 1, a - 1)
      if before == ' ' or before == '\t' or before == '\n' or before == '\r' then
        local b = open:find(q, a + #key, true)
        if b then return open:sub(a + #key, b - 1) end
        break
      end
      i = a + 1
    end
  end
  return nil
end

local function tag_list(list)
  local out, seen = {}, {}
  for _, t in ipairs(list) do
    t = trim(tostring(t)):lower()
    if t ~= '' and #t <= 40 and not seen[t] then
      seen[t] = true
      out[#out + 1] = t
    end
    if #out >= 8 then break end
  end
  return out
end
M.tag_list = tag_list

-- Items of an RSS 2.0 or Atom document: {{title, url, summary, tags}}.
function M.parse_feed(body)
  if type(body) ~= 'string' then error('parse_feed: the feed body must be a string') end
  local items, atom = {}, body:find('<feed', 1, true) ~= nil and body:find('<item', 1, true) == nil
  local unit = atom and 'entry' or 'item'
  local pos = 1
  while #items < M.MAX_ITEMS do
    local block, _, after = element(body, unit, pos)
    if not block then break end
    pos = after
    local title = text_of(element(block, 'title') or '', 300)
    local url, summary
    local tags = {}
    if atom then
      local p = 1
      while true do
        local _, open, nxt = element(block, 'link', p)
        if not open then break end
        local rel = attr(open, 'rel')
        if not url or rel == nil or rel == 'alternate' then url = attr(open, 'href') or url end
        p = nxt
      end
      summary = element(block, 'summary') or element(block, 'content') or ''
      p = 1
      while true do
        local _, open, nxt = element(block, 'category', p)
        if not open then break end
        tags[#tags + 1] = attr(open, 'term') or ''
        p = nxt
      end
    else
      url = text_of(element(block, 'link') or '', 1000)
      if url == '' then url = text_of(element(block, 'guid') or '', 1000) end
      summary = element(block, 'description') or ''
      local p = 1
      while true do
        local c, _, nxt = element(block, 'category', p)
        if not c then break end
        tags[#tags + 1] = text_of(c, 40)
        p = nxt
      end
    end
    url = trim(unescape(url or ''))
    if title ~= '' and url:find('^https?://') then
      items[#items + 1] = {title = title, url = url, summary = text_of(summary, 600), tags = tag_list(tags)}
    end
  end
  return items, atom and 'atom' or 'rss'
end

-- Items of the saved-links API's answer: {"links": [{url, title, excerpt|summary, tags}]} or a list.
function M.parse_links(body)
  local ok, doc = pcall(json.decode, body)
  if not ok or type(doc) ~= 'table' then error('the saved-links API did not answer JSON') end
  local list = doc.links or doc.items or doc
  local items = {}
  for _, l in ipairs(list) do
    if type(l) == 'table' and type(l.url) == 'string' and l.url:find('^https?://') then
      items[#items + 1] = {title = clip(trim(l.title or l.url), 300), url = clip(l.url, 1000),
                           summary = clip(trim(l.excerpt or l.summary or ''), 600),
                           tags = tag_list(type(l.tags) == 'table' and l.tags or {})}
    end
    if #items >= M.MAX_ITEMS then break end
  end
  return items
end

function M.settings()
  local s = db.one('SELECT * FROM my_reader_settings')
  if not s then error('reader: not set up for this user (the admin calls reader_setup first)') end
  s.feeds = json.decode(s.feeds or '[]')
  return s
end

-- Fetch every configured source (outside effects only; storing is separate): a list of
-- {kind, source, title, url, summary, tags} and the errors per source.
function M.fetch_sources(s)
  local found, errors = {}, {}
  for _, f in ipairs(s.feeds) do
    local ok, err = pcall(function()
      local headers = {accept = f.kind == 'links' and 'application/json' or 'application/rss+xml, application/atom+xml, text/xml'}
      if f.token then headers.authorization = vault.bearer(f.token) end
      local r = http.get(f.url, {headers = headers, timeout = 10})
      if not r.ok then error('HTTP ' .. r.status) end
      local items, kind
      if f.kind == 'links' then
        items, kind = M.parse_links(r.body), 'links'
      else
        items, kind = M.parse_feed(r.body)
      end
      for _, it in ipairs(items) do
        it.kind, it.source = kind, f.url
        found[#found + 1] = it
      end
    end)
    if not ok then errors[#errors + 1] = {source = f.url, error = clip(tostring(err), 300)} end
  end
  return found, errors
end

-- Store new items (ones whose URL the user has not seen); returns how many were new.
function M.store_items(items)
  local n = 0
  for _, it in ipairs(items) do
    local seen = db.one('SELECT id FROM my_reader_items WHERE url = {u:String}', {u = it.url})
    if not seen then
      db.exec([[INSERT INTO my_reader_items (kind, source, url, title, summary, tags)
                VALUES ({k:String}, {s:String}, {u:String}, {t:String}, {m:String}, {g:String})]],
              {k = it.kind, s = it.source, u = it.url, t = it.title, m = it.summary or '',
               g = json.encode(it.tags or {})})
      n = n + 1
    end
  end
  return n
end

-- The preference notes: {likes = {topics, body}, dislikes = {topics, body}}.
local function read_note(path, title)
  local n = file.md.read(path)
  if not n then
    return {topics = {}, body = '# ' .. title .. '\n\nWrite here in your own words; the daily ranking reads this note.\n'}
  end
  local meta = type(n.meta) == 'table' and n.meta or {}
  return {topics = type(meta.topics) == 'table' and meta.topics or {}, body = n.body or ''}
end

function M.preferences()
  return {likes = read_note(M.LIKES, 'What I like'), dislikes = read_note(M.DISLIKES, 'What I dislike')}
end

local function has(list, x)
  for _, v in ipairs(list) do if v == x then return true end end
  return false
end

local function without(list, drop)
  local out = {}
  for _, v in ipairs(list) do if not has(drop, v) then out[#out + 1] = v end end
  return out
end

-- Apply the user's current verdict on `item` to the notes: its topics join the liked (or
-- disliked) topics and leave the other list, and a line about it is added to the note's text.
-- Idempotent (applying the same verdict twice changes nothing), so a workflow step may repeat.
function M.apply_verdict(item_id)
  local row = db.one([[SELECT f.verdict, i.title, i.tags, d.day FROM my_reader_feedback f
                       JOIN my_reader_items i ON i.id = f.item JOIN my_reader_digests d ON d.id = f.digest
                       WHERE f.item = {i:Int64}]], {i = item_id})
  if not row then return nil end
  local tags = json.decode(row.tags or '[]')
  local p = M.preferences()
  local mine, other = p.likes, p.dislikes
  local mine_path, other_path = M.LIKES, M.DISLIKES
  if row.verdict < 0 then mine, other, mine_path, other_path = other, mine, other_path, mine_path end
  local changed = false
  for _, t in ipairs(tags) do
    if not has(mine.topics, t) then mine.topics[#mine.topics + 1] = t; changed = true end
  end
  local before = #other.topics
  other.topics = without(other.topics, tags)
  local line = string.format('- %s: %s "%s"%s', row.day, row.verdict > 0 and 'liked' or 'disliked', row.title,
                             #tags > 0 and (' (' .. table.concat(tags, ', ') .. ')') or '')
  if not mine.body:find(line, 1, true) then
    if mine.body:sub(-1) ~= '\n' then mine.body = mine.body .. '\n' end
    mine.body = mine.body .. line .. '\n'
    changed = true
  end
  if changed then file.md.write(mine_path, {topics = mine.topics}, mine.body) end
  if #other.topics ~= before then file.md.write(other_path, {topics = other.topics}, other.body) end
  return {verdict = row.verdict, topics = tags}
end

-- The ranking prompt: both notes in full, then the items.
function M.prompt(prefs, items)
  local lines = {
    '## What I like', 'Topics: ' .. table.concat(prefs.likes.topics, ', '), '', trim(prefs.likes.body), '',
    "## What I dislike", 'Topics: ' .. table.concat(prefs.dislikes.topics, ', '), '', trim(prefs.dislikes.body), '',
    "## Today's items"}
  for _, it in ipairs(items) do
    local tags = json.decode(it.tags or '[]')
    lines[#lines + 1] = string.format('[%d] %s — tags: %s', it.id, clip(it.title, 200), table.concat(tags, ', '))
    if it.summary and it.summary ~= '' then lines[#lines + 1] = '    ' .. clip(it.summary, 300) end
  end
  return table.concat(lines, '\n')
end

M.SYSTEM = 'You are a reading assistant. Rank every one of today\'s items for this reader, best first, '
  .. 'using what they like and dislike (topics and their own words). Score each item from -10 (skip) to '
  .. '10 (must read) and give a short reason. Answer with JSON {"ranking": [{"id", "score", "reason"}]}.'

-- Rank items (rows of my_reader_items) with the model: {ranking = {{id, score, reason}}, generation}.
function M.rank(items)
  local ids = {}
  for _, it in ipairs(items) do ids[#ids + 1] = it.id end
  local schema = {type = 'object', required = {'ranking'}, properties = {ranking = {
    type = 'array', items = {type = 'object', required = {'id', 'score'}, properties = {
      id = {type = 'integer'}, score = {type = 'number'}, reason = {type = 'string'}}}}}}
  local obj, info = ai.generate_object{system = M.SYSTEM, prompt = M.prompt(M.preferences(), items),
                                       schema = schema, temperature = 0}
  -- Keep the model's order for the ids it knows; append any it left out (never drop an item).
  local known, seen, ranking = {}, {}, {}
  for _, id in ipairs(ids) do known[id] = true end
  for _, r in ipairs(obj.ranking) do
    local id = math.tointeger(r.id)
    if id and known[id] and not seen[id] then
      seen[id] = true
      ranking[#ranking + 1] = {id = id, score = tonumber(r.score) or 0, reason = clip(r.reason or '', 300)}
    end
  end
  table.sort(ranking, function(a, b) return a.score > b.score end)
  for _, id in ipairs(ids) do
    if not seen[id] then ranking[#ranking + 1] = {id = id, score = -100, reason = 'not ranked by the model'} end
  end
  return {ranking = ranking, generation = info.id}
end

-- The digest's items, best first, with the user's verdicts: {{id, n, title, url, ...}}.
function M.digest_items(d, size)
  local out = {}
  for n, r in ipairs(json.decode(d.ranking)) do
    if n > size then break end
    local it = db.one('SELECT id, kind, source, url, title, summary, tags FROM my_reader_items WHERE id = {i:Int64}', {i = r.id})
    if it then
      local fb = db.one('SELECT verdict FROM my_reader_feedback WHERE item = {i:Int64}', {i = r.id})
      it.n, it.score, it.reason = n, r.score, r.reason
      it.tags = json.decode(it.tags or '[]')
      it.verdict = fb and fb.verdict or 0
      out[#out + 1] = it
    end
  end
  return out
end

function M.subject(day, rest) return '[reader ' .. day .. '] ' .. rest end

function M.digest_markdown(day, items)
  local lines = {'# Your reading for ' .. day, ''}
  for _, it in ipairs(items) do
    local link = it.url:sub(1, 4) == 'mid:' and ('**' .. it.title .. '** (newsletter)') or ('**[' .. it.title .. '](' .. it.url .. ')**')
    lines[#lines + 1] = string.format('%d. %s — %s', it.n, link, it.reason ~= '' and it.reason or table.concat(it.tags, ', '))
  end
  lines[#lines + 1] = ''
  lines[#lines + 1] = 'Reply to this email with `+N` for what you liked and `-N` for what you did not (for example `+1 -3`), '
    .. 'or use the buttons on your dashboard or in chat.'
  return table.concat(lines, '\n')
end

function M.chat_digest(day, items)
  local lines, buttons = {'Your reading for ' .. day .. ':'}, {}
  for _, it in ipairs(items) do
    lines[#lines + 1] = string.format('%d. %s%s', it.n, it.title, it.url:sub(1, 4) == 'mid:' and '' or (' — ' .. it.url))
    buttons[#buttons + 1] = {text = '👍 ' .. it.n, data = 'fb:' .. it.id .. ':1'}
    buttons[#buttons + 1] = {text = '👎 ' .. it.n, data = 'fb:' .. it.id .. ':-1'}
  end
  return table.concat(lines, '\n'), buttons
end

-- Verdicts in a reply's text: {{n = item number, verdict = 1 | -1}}. Quoted lines ('>') are
-- skipped; '+2', '-3', 'like 2', 'dislike 3', '👍 2', '👎 3' are understood.
function M.parse_verdicts(text)
  local out, seen = {}, {}
  local function add(n, v)
    if n == nil then return end
    n = math.tointeger(tonumber(n))
    if n and n >= 1 and n <= 100 and not seen[n] then seen[n] = true; out[#out + 1] = {n = n, verdict = v} end
  end
  text = tostring(text or '')
  local pos, count = 1, 0
  while pos <= #text and count < 200 do
    local nl = text:find('\n', pos, true) or (#text + 1)
    local line = trim(text:sub(pos, nl - 1))
    pos, count = nl + 1, count + 1
    if line:sub(1, 1) ~= '>' and #line <= 500 then
      -- words (short tokens, so the patterns below stay cheap), trailing punctuation dropped
      local words = {}
      for w in line:lower():gmatch('%S+') do
        if #w <= 24 then
          while #w > 0 and (',;.!:'):find(w:sub(-1), 1, true) do w = w:sub(1, -2) end
          words[#words + 1] = w
        end
      end
      local VERB = {['+'] = 1, ['-'] = -1, like = 1, dislike = -1, ['👍'] = 1, ['👎'] = -1}
      for i, w in ipairs(words) do
        local sign, n = w:match('^([%+%-])(%d+)$')
        if sign then
          add(n, sign == '+' and 1 or -1)
        else
          local e, m = w:match('^(👍)(%d+)$')
          if not e then e, m = w:match('^(👎)(%d+)$') end
          if e then
            add(m, VERB[e])
          elseif VERB[w] and words[i + 1] then
            add(words[i + 1]:match('^#?(%d+)$'), VERB[w])
          end
        end
      end
    end
  end
  return out
end

-- Record the user's verdict on an item of one of their digests: stored (the latest verdict
-- wins), attached to the generation that ranked it (ai.rate), signalled to the day's workflow
-- (which updates the preference notes) or, when that workflow has finished, applied at once.
function M.record(item_id, verdict, via)
  item_id = math.tointeger(tonumber(item_id))
  verdict = math.tointeger(tonumber(verdict))
  if not item_id then error({code = 'BAD_ITEM', message = 'reader: item must be an item id'}) end
  if verdict ~= 1 and verdict ~= -1 then error({code = 'BAD_VERDICT', message = 'reader: verdict must be 1 or -1'}) end
  if via ~= 'dashboard' and via ~= 'email' and via ~= 'chat' then error('reader: unknown channel') end
  local d = db.one([[SELECT d.id, d.day, d.flow_id, d.generation, i.title FROM my_reader_items i
                     JOIN my_reader_digests d ON d.day = i.day WHERE i.id = {i:Int64}]], {i = item_id})
  if not d then error({code = 'NOT_IN_DIGEST', message = 'reader: item ' .. item_id .. ' is in none of your digests'}) end
  local prev = db.one('SELECT verdict FROM my_reader_feedback WHERE item = {i:Int64}', {i = item_id})
  if prev and prev.verdict == verdict then return {item = item_id, verdict = verdict, changed = false} end
  db.tx(function()
    if prev then
      db.exec('UPDATE my_reader_feedback SET verdict = {v:Int64}, via = {w:String} WHERE item = {i:Int64}',
              {v = verdict, w = via, i = item_id})
    else
      db.exec('INSERT INTO my_reader_feedback (digest, item, verdict, via) VALUES ({d:Int64}, {i:Int64}, {v:Int64}, {w:String})',
              {d = d.id, i = item_id, v = verdict, w = via})
    end
  end)
  if d.generation then
    pcall(ai.rate, d.generation, verdict, (verdict > 0 and 'liked' or 'disliked') .. ' "' .. clip(d.title, 200) .. '" via ' .. via)
  end
  local signalled = false
  if d.flow_id then
    signalled = pcall(flow.signal, d.flow_id, 'feedback', {item = item_id, verdict = verdict, via = via})
    if signalled then
      local st = flow.status(d.flow_id)
      signalled = st and st.status ~= 'completed' and st.status ~= 'failed' and st.status ~= 'cancelled'
    end
  end
  if not signalled then M.apply_verdict(item_id) end
  return {item = item_id, verdict = verdict, changed = true, signalled = signalled}
end

-- The digest of `day` (or the latest) with its items, for the dashboard and the handlers.
function M.digest(day)
  if day then return db.one('SELECT * FROM my_reader_digests WHERE day = {d:String}', {d = day}) end
  return db.one('SELECT * FROM my_reader_digests ORDER BY day DESC LIMIT 1')
end

function M.dashboard_props(d, size)
  local items = M.digest_items(d, size)
  local p = M.preferences()
  return {day = d.day, digest = d.id, generation = d.generation, items = items,
          likes = p.likes.topics, dislikes = p.dislikes.topics}
end

return function() return M end
