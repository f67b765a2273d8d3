-- reader_email: the inbound-email handler ([email_in] addresses."reader@..." = {user, function =
-- "reader_email"}), invoked as the addressed user with {event = "email", email = {...}}.
-- A reply to a digest ("[reader YYYY-MM-DD]" in the subject, or In-Reply-To set) carries
-- verdicts ("+1 -3", "like 2") when it comes from the reader's address; anything else is a newsletter, stored as an item for the next
-- ranking. The privacy guard redacts codes and secrets in it before any model sees it.
return function(input, ctx)
  if not ctx.user_id then error('reader_email runs as the addressed user') end
  local e = type(input) == 'table' and (input.email or input) or nil
  if type(e) ~= 'table' then error('an email is expected') end
  local R = fn.call('reader_lib', {})
  local subject = R.clip(e.subject or '', 500)
  local day = subject:match('%[reader (%d%d%d%d%-%d%d%-%d%d)%]')
  if day then
    -- Only the reader's own address may rate (anyone may send a newsletter).
    local s = R.settings()
    if not tostring(e.from or ''):lower():find(s.email:lower(), 1, true) then
      return {kind = 'reply', day = day, ignored = 'not from the reader\'s address'}
    end
    local d = R.digest(day)
    if not d then return {kind = 'reply', day = day, error = 'no digest for that day'} end
    local items = R.digest_items(d, 100)
    local done = {}
    for _, v in ipairs(R.parse_verdicts(e.text or '')) do
      local it = items[v.n]
      if it then
        R.record(it.id, v.verdict, 'email')
        done[#done + 1] = {item = it.id, n = v.n, verdict = v.verdict}
      end
    end
    return {kind = 'reply', day = day, verdicts = done}
  end
  local from = tostring(e.from or 'unknown')
  local lt = from:find('<', 1, true)
  local name = R.trim(type(e.from_name) == 'string' and e.from_name or (lt and from:sub(1, lt - 1)) or from)
  if name:sub(1, 1) == '"' and name:sub(-1) == '"' then name = name:sub(2, -2) end
  if name == '' then name = from end
  local mid = tostring(e.message_id or e.id or '')
  local n = R.store_items({{kind = 'newsletter', source = from, url = 'mid:' .. mid,
                            title = subject ~= '' and subject or '(no subject)',
                            summary = R.clip(R.trim(e.text or ''), 1500),
                            tags = R.tag_list({'newsletter', name})}})
  return {kind = 'newsletter', stored = n}
end
