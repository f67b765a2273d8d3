-- reader_chat: the chat handler ([chat.<provider>] function = "reader_chat"), invoked as the
-- linked user with {event = "chat", message = {provider, chat_id, text, callback, ...}}.
-- A button press carries callback "fb:<item>:<1|-1>"; a text like "+1 -3" or "like 2" rates
-- the latest digest's items by number. Each verdict is confirmed in the chat.
return function(input, ctx)
  if not ctx.user_id then
    return {ignored = 'this chat is not linked to a reader user'}
  end
  local m = type(input) == 'table' and (input.message or input) or nil
  if type(m) ~= 'table' then error('a chat message is expected') end
  local R = fn.call('reader_lib', {})
  local done = {}
  if type(m.callback) == 'string' then
    local item, v = m.callback:match('^fb:(%d+):(%-?1)$')
    if not item then return {ignored = 'unknown button'} end
    local r = R.record(tonumber(item), tonumber(v), 'chat')
    done[#done + 1] = r
  else
    local d = R.digest(nil)
    if d then
      local items = R.digest_items(d, 100)
      for _, v in ipairs(R.parse_verdicts(m.text or '')) do
        if items[v.n] then done[#done + 1] = R.record(items[v.n].id, v.verdict, 'chat') end
      end
    end
  end
  if chat and m.chat_id and #done > 0 then
    local words = {}
    for _, r in ipairs(done) do
      local it = db.one('SELECT title FROM my_reader_items WHERE id = {i:Int64}', {i = r.item})
      words[#words + 1] = (r.verdict > 0 and '👍 ' or '👎 ') .. (it and it.title or ('item ' .. r.item))
    end
    chat.send{provider = m.provider, chat_id = m.chat_id, text = 'Noted: ' .. table.concat(words, '; ')}
  end
  return {verdicts = done}
end
