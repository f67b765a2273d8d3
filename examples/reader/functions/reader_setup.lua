-- reader_setup (admin): set the reader up for one user and schedule their daily run.
-- POST /fn/reader_setup {"user": "<user id or email>", "email": "ann@example.com",
--   "reply_to": "reader@in.example.com", "tz": "Asia/Tokyo", "at": "0 7 * * *", "evening": "21:30",
--   "digest_size": 5, "feeds": [{"url": "https://blog.rust-lang.org/feed.xml", "kind": "rss"},
--   {"url": "https://links.example.com/api/saved", "kind": "links", "token": "reader_links"}],
--   "chat": {"provider": "telegram", "chat_id": "12345"}}
-- `token` names a vault secret (PUT /vault/reader_links, scoped to "reader_*"), never the value.
-- The schedule runs reader_day as that user (flow.schedule's `user`): one reader per server,
-- since a workflow has one schedule.
return function(input, ctx)
  if ctx.role ~= 'admin' then error({code = 'ADMIN_ONLY', message = 'reader_setup is for the admin'}) end
  if type(input.user) ~= 'string' or input.user == '' then error('user (id or email) is required') end
  if type(input.email) ~= 'string' or not input.email:find('^[^@%s]+@[^@%s]+$') then error('email is required') end
  local tz = input.tz or 'UTC'
  flow.localtime(0, tz) -- refuses an unknown time zone
  local evening = input.evening or '21:30'
  if not evening:find('^%d%d?:%d%d$') then error('evening must be HH:MM') end
  local feeds = input.feeds or {}
  if type(feeds) ~= 'table' then error('feeds must be a list') end
  for i, f in ipairs(feeds) do
    if type(f) ~= 'table' or type(f.url) ~= 'string' or not f.url:find('^https?://') then
      error('feed ' .. i .. ': url (http or https) is required')
    end
    if f.kind ~= nil and f.kind ~= 'rss' and f.kind ~= 'links' then error('feed ' .. i .. ': kind is rss or links') end
    if f.token ~= nil and type(f.token) ~= 'string' then error('feed ' .. i .. ': token is the name of a vault secret') end
    feeds[i] = {url = f.url, kind = f.kind or 'rss', token = f.token}
  end
  local size = math.tointeger(input.digest_size or 5)
  if not size or size < 1 or size > 20 then error('digest_size must be 1 to 20') end
  local chat_ = type(input.chat) == 'table' and input.chat or {}
  local sched = flow.schedule('reader_day', input.at or '0 7 * * *',
                              {tz = tz, user = input.user, missed = 'once'})
  db.exec([[INSERT INTO reader_settings (owner, email, reply_to, tz, feeds, chat_provider, chat_id, digest_size, evening)
            VALUES ({o:String}, {e:String}, NULLIF({r:String}, ''), {t:String}, {f:String}, NULLIF({cp:String}, ''),
                    NULLIF({ci:String}, ''), {n:Int64}, {ev:String})
            ON CONFLICT (owner) DO UPDATE SET email = excluded.email, reply_to = excluded.reply_to, tz = excluded.tz,
              feeds = excluded.feeds, chat_provider = excluded.chat_provider, chat_id = excluded.chat_id,
              digest_size = excluded.digest_size, evening = excluded.evening,
              updated_at = strftime('%Y-%m-%dT%H:%M:%fZ','now')]],
          {o = sched.user_id, e = input.email, r = tostring(input.reply_to or ''), t = tz, f = json.encode(feeds),
           cp = tostring(chat_.provider or ''), ci = chat_.chat_id and tostring(chat_.chat_id) or '', n = size, ev = evening})
  return {user = sched.user_id, next_run = sched.next_at, tz = tz, feeds = #feeds}
end
