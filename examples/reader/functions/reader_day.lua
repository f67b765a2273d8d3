-- reader_day: the daily workflow (flow.define), started by the user's cron schedule at the
-- morning tick in their time zone (reader_setup), or by hand: POST /fn/reader_day {} as the user.
--
--   ingest   fetch the feeds and the saved-links API (ctx.step: outside calls, at least once),
--            store new items (ctx.tx: exactly once; newsletters arrive by email meanwhile)
--   rank     ai.generate_object against the preference notes (ctx.step)
--   deliver  the digest row, the email and the chat message (ctx.tx: the outbox rows commit
--            with the journal, so a crash never sends twice), then the dashboard (ui.deploy)
--   wait     every feedback event until the evening updates the preference notes (ctx.step)
--   evening  the wind-down message (ctx.tx), then the workflow ends
return flow.define('reader_day', function(ctx, input)
  local R = fn.call('reader_lib', {})
  local s = ctx.tx('settings', function() return R.settings() end)
  local t0 = ctx.scheduled_at or (input and input.at) or ctx.now()
  local lt = flow.localtime(t0, s.tz)
  local day = (input and input.day) or lt.date

  -- Ingest.
  local fetched = ctx.step('fetch', function()
    local items, errors = R.fetch_sources(s)
    return {items = items, errors = errors}
  end, {retries = 2, backoff = 5, timeout = 60})
  local new = ctx.tx('store', function() return R.store_items(fetched.items) end)

  -- Rank everything not yet in a digest (feeds and newsletters alike).
  local ranked = ctx.step('rank', function()
    local items = db.query('SELECT id, kind, title, summary, tags FROM my_reader_items WHERE day IS NULL ORDER BY id LIMIT {n:Int64}',
                           {n = R.MAX_ITEMS})
    if #items == 0 then return {ranking = {}, generation = nil} end
    return R.rank(items)
  end, {retries = 2, backoff = 10, timeout = 120})
  if #ranked.ranking == 0 then
    return {day = day, new = new, ranked = 0, errors = fetched.errors}
  end

  -- Deliver: digest row + outbox messages in one transaction with the journal entry.
  local digest = ctx.tx('deliver', function()
    if not R.digest(day) then
      db.exec([[INSERT INTO my_reader_digests (day, flow_id, generation, ranking)
                VALUES ({d:String}, {f:String}, NULLIF({g:String}, ''), {r:String})]],
              {d = day, f = ctx.id, g = ranked.generation or '', r = json.encode(ranked.ranking)})
      for _, r in ipairs(ranked.ranking) do
        db.exec('UPDATE my_reader_items SET day = {d:String} WHERE id = {i:Int64} AND day IS NULL', {d = day, i = r.id})
      end
    end
    local d = R.digest(day)
    local items = R.digest_items(d, s.digest_size)
    local top = items[1] and items[1].title or ''
    notify.email{to = s.email, reply_to = s.reply_to, subject = R.subject(day, #items .. ' picks: ' .. R.clip(top, 80)),
                 markdown = R.digest_markdown(day, items), idempotency_key = 'reader-digest-' .. day}
    if s.chat_id and chat then
      local text, buttons = R.chat_digest(day, items)
      chat.send{provider = s.chat_provider, chat_id = s.chat_id, text = text, buttons = buttons}
    end
    return {id = d.id, size = #items}
  end)
  ctx.step('dashboard', function()
    local d = R.digest(day)
    return ui.deploy{name = 'reader', code = R.DASHBOARD, props = R.dashboard_props(d, s.digest_size)}.version
  end)

  -- Feedback until the evening: each verdict updates the preference notes as it comes.
  local eh, em = (s.evening or '21:30'):match('^(%d%d?):(%d%d)$')
  local evening = t0 - (lt.hour * 3600 + lt.minute * 60 + lt.second) + (tonumber(eh) or 21) * 3600 + (tonumber(em) or 30) * 60
  if evening <= t0 then evening = evening + 86400 end
  local verdicts = 0
  while true do
    local left = evening - ctx.now()
    if left <= 0 then break end
    local ev = ctx.wait_event('feedback', {timeout = left})
    if not ev then break end
    if math.tointeger(ev.item) then
      ctx.step('prefs', function() return R.apply_verdict(math.tointeger(ev.item)) end)
      verdicts = verdicts + 1
    end
  end

  -- The evening wind-down.
  local sent = ctx.tx('evening', function()
    local fb = db.query([[SELECT f.verdict, i.title FROM my_reader_feedback f JOIN my_reader_items i ON i.id = f.item
                          WHERE f.digest = {d:Int64} ORDER BY f.id]], {d = digest.id})
    local liked, disliked = {}, {}
    for _, r in ipairs(fb) do
      if r.verdict > 0 then liked[#liked + 1] = r.title else disliked[#disliked + 1] = r.title end
    end
    local p = R.preferences()
    local unread = db.one([[SELECT i.title, i.url FROM my_reader_items i WHERE i.day = {d:String}
                            AND i.id NOT IN (SELECT item FROM my_reader_feedback) ORDER BY i.id LIMIT 1]], {d = day})
    local lines = {'# Time to wind down (' .. day .. ')', '',
                   string.format('Today you liked %d and passed on %d of your picks.', #liked, #disliked)}
    if #liked > 0 then lines[#lines + 1] = 'Liked: ' .. table.concat(liked, '; ') end
    if #p.likes.topics > 0 then
      lines[#lines + 1] = "Tomorrow's picks lean towards: " .. table.concat(p.likes.topics, ', ') .. '.'
    end
    if unread then lines[#lines + 1] = 'Something slow for tonight, if you like: ' .. unread.title end
    lines[#lines + 1] = ''
    lines[#lines + 1] = 'Screens off soon. Good night.'
    local text = table.concat(lines, '\n')
    notify.email{to = s.email, subject = R.subject(day, 'Evening wind-down'), markdown = text,
                 idempotency_key = 'reader-evening-' .. day}
    if s.chat_id and chat then
      chat.send{provider = s.chat_provider, chat_id = s.chat_id, text = text:gsub('^# ', '')}
    end
    return {liked = #liked, disliked = #disliked}
  end)
  return {day = day, new = new, ranked = #ranked.ranking, digest = digest.id, verdicts = verdicts,
          evening = sent, errors = fetched.errors}
end)
