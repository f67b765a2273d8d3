-- reader_today (user): the latest digest (or {"day": "YYYY-MM-DD"}'s) as the dashboard shows it.
return function(input, ctx)
  if not ctx.user_id then error('sign in first') end
  local R = fn.call('reader_lib', {})
  local day = type(input) == 'table' and input.day or nil
  if day ~= nil and (type(day) ~= 'string' or not day:find('^%d%d%d%d%-%d%d%-%d%d$')) then error('day must be YYYY-MM-DD') end
  local d = R.digest(day)
  if not d then return {day = day, items = {}} end
  local s = R.settings()
  return R.dashboard_props(d, s.digest_size)
end
