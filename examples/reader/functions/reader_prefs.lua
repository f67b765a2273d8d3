-- reader_prefs (user): read or edit the preference notes by hand.
-- POST /fn/reader_prefs {}                                    → {likes = {topics, body}, dislikes = {...}}
-- POST /fn/reader_prefs {"likes": {"topics": [...], "body": "..."}}  replaces that note (either or both)
-- The notes are Markdown files with front matter (users/<id>/reader/likes.md, dislikes.md in the
-- file store), so they can also be edited there directly.
return function(input, ctx)
  if not ctx.user_id then error('sign in first') end
  local R = fn.call('reader_lib', {})
  for key, path in pairs({likes = R.LIKES, dislikes = R.DISLIKES}) do
    local n = type(input) == 'table' and input[key] or nil
    if n ~= nil then
      if type(n) ~= 'table' or type(n.body or '') ~= 'string' or type(n.topics or {}) ~= 'table' then
        error(key .. ' must be {topics = [...], body = "..."}')
      end
      if #(n.body or '') > 65536 then error(key .. ': the note is over 64 KiB') end
      file.md.write(path, {topics = R.tag_list(n.topics or {})}, n.body or '')
    end
  end
  return R.preferences()
end
