-- reader_feedback (user): a like (1) or dislike (-1) on an item of one of the user's digests,
-- from the dashboard's buttons: POST /fn/reader_feedback {"item": 12, "verdict": 1}.
return function(input, ctx)
  if not ctx.user_id then error('sign in first') end
  if type(input) ~= 'table' then error('input must be an object') end
  local R = fn.call('reader_lib', {})
  return R.record(input.item, input.verdict, 'dashboard')
end
