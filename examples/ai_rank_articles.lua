-- Rank articles against a reader's preferences (Markdown-like text) with ai.generate_object.
--
-- Deploy:  curl -X PUT --data-binary @examples/ai_rank_articles.lua -H "Authorization: Bearer $KEY" \
--            http://127.0.0.1:8123/fn/rank_articles
-- Call:    POST /fn/rank_articles {"preferences": "# I like\n- Rust\n", "articles": [{"id": 1, "title": "...", "summary": "..."}, ...]}
-- Answer:  {"ranked": [{"id", "title", "score", "reason"}, ...best first], "generation": "gen-...", "usage": {...}, "cost": ...}
-- The reader's "liked / disliked" goes to POST /ai/generations/{generation}/feedback {"score": 1 | -1}.

return function(input)
  local prefs, articles = input.preferences, input.articles
  if type(prefs) ~= 'string' or prefs == '' then error('preferences (text) is required') end
  if type(articles) ~= 'table' or #articles == 0 or #articles > 50 then
    error('articles must be a list of 1 to 50 {id, title, summary}')
  end
  local ids, by_id, lines = {}, {}, {}
  for i, a in ipairs(articles) do
    if math.type(a.id) ~= 'integer' or type(a.title) ~= 'string' then
      error('article ' .. i .. ' needs an integer id and a title')
    end
    ids[#ids + 1] = a.id
    by_id[a.id] = a
    lines[#lines + 1] = string.format('- id %d: %s — %s', a.id, a.title, a.summary or '')
  end
  local schema = {
    type = 'object', required = {'ranking'}, additionalProperties = false,
    properties = {ranking = {
      type = 'array', minItems = #ids, maxItems = #ids,
      items = {type = 'object', required = {'id', 'score', 'reason'}, additionalProperties = false,
               properties = {id = {type = 'integer', enum = ids},
                             score = {type = 'number', minimum = 0, maximum = 10},
                             reason = {type = 'string', maxLength = 300}}}}}}
  local obj, info = ai.generate_object{
    system = 'You rank articles for one reader. Score each from 0 (skip) to 10 (must read) against the preferences, best first, every article exactly once.',
    prompt = '## Preferences\n' .. prefs .. '\n\n## Articles\n' .. table.concat(lines, '\n'),
    schema = schema, temperature = 0,
  }
  local ranked, seen = {}, {}
  for _, r in ipairs(obj.ranking) do
    if seen[r.id] then error('the model ranked article ' .. r.id .. ' twice') end
    seen[r.id] = true
    ranked[#ranked + 1] = {id = r.id, title = by_id[r.id].title, score = r.score, reason = r.reason}
  end
  return {ranked = ranked, generation = info.id, usage = info.usage, cost = info.cost}
end
