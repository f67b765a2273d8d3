// Interop test: the official ClickHouse JS client (@clickhouse/client) against ichibase.
//
//   node tests/clickhouse-js/client_test.mjs http://127.0.0.1:8123
//
// Runs every check even after a failure, prints one line per check, and exits non-zero if any
// check failed. Run by `cargo test --test clickhouse_js`, which starts a fresh server first.
// Needs `npm ci --prefix tests/clickhouse-js`.

import assert from 'node:assert/strict'
import { gzipSync } from 'node:zlib'
import { createClient, ClickHouseError } from '@clickhouse/client'

const url = process.argv[2]
// Credentials: the ClickHouse client sends Basic auth; an ichibase API key goes in the password.
const password = process.env.ICHIBASE_KEY ?? ''
const auth = { username: 'default', password }
if (!url) {
  console.error('usage: node client_test.mjs <server url, e.g. http://127.0.0.1:8123>')
  process.exit(2)
}

// The client logs failed requests itself; the error cases below are expected, keep them quiet.
const client = createClient({ url, ...auth, request_timeout: 30_000, log: { level: 127 /* OFF */ } })

let failed = 0
let passed = 0
async function check(name, fn) {
  try {
    const detail = await fn()
    passed++
    console.log(`ok    ${name}${detail ? ` (${detail})` : ''}`)
  } catch (e) {
    failed++
    console.log(`FAIL  ${name}\n      ${String(e?.stack ?? e).split('\n').join('\n      ')}`)
  }
}

/** Rejects unless `promise` rejects; returns the error. */
async function rejection(promise) {
  try {
    await promise
  } catch (e) {
    return e
  }
  assert.fail('expected the call to reject, but it resolved')
}

/** The server's own error for `sql`, fetched without the client: {code, message}. */
async function serverError(sql, params = {}) {
  const qs = new URLSearchParams(params)
  const r = await fetch(`${url}/?${qs}`, { method: 'POST', body: sql, headers: { Authorization: `Bearer ${password}` } })
  assert.notEqual(r.status, 200, `server accepted ${JSON.stringify(sql)}`)
  const body = await r.text()
  const code = r.headers.get('x-clickhouse-exception-code')
  // Plain text (`Code: N. DB::Exception: msg. (NAME)`) or, for JSON formats, {"error": {...}}.
  let message
  try {
    message = JSON.parse(body).error.message
  } catch {
    message = body.match(/DB::Exception: (.*)\. \([A-Z_]+\)\s*$/s)?.[1]
  }
  assert.ok(message, `could not find the message in the server's error: ${body}`)
  return { code, message, body }
}

const TABLE = 'js_items'
const TRICKY = "it's a \"test\"\t日本語 \\ back\nslash"
const NAME = "it's a \"test\"\t日本語"

await check('ping() (GET /ping)', async () => {
  const r = await client.ping()
  assert.equal(r.success, true, `ping failed: ${r.error}`)
})

await check('ping({ select: true }) (GET ?query=SELECT ...)', async () => {
  const r = await client.ping({ select: true })
  assert.equal(r.success, true, `ping failed: ${r.error}`)
})

await check('command(): CREATE TABLE', async () => {
  const r = await client.command({
    query: `CREATE TABLE ${TABLE} (id INTEGER PRIMARY KEY, name TEXT NOT NULL, score REAL, tag TEXT)`,
  })
  assert.ok(r.query_id, 'no query_id')
})

await check('insert(): JSONEachRow objects, summary counts rows', async () => {
  const r = await client.insert({
    table: TABLE,
    format: 'JSONEachRow',
    values: [
      { id: 1, name: 'one', score: 1.5, tag: 'a' },
      { id: 2, name: NAME, score: 2.25, tag: null },
      { id: 3, name: NAME, score: null, tag: 'c' },
      { id: 4, name: 'four', score: 4, tag: 'd' },
      { id: 5, name: TRICKY, score: -0.5, tag: 'e' },
    ],
  })
  assert.equal(r.executed, true)
  assert.equal(r.summary?.written_rows, '5', `summary: ${JSON.stringify(r.summary)}`)
  return `written_rows=${r.summary.written_rows}`
})

await check('insert(): with a column list', async () => {
  await client.insert({ table: TABLE, columns: ['id', 'name'], format: 'JSONEachRow', values: [{ id: 6, name: 'six' }] })
  const rs = await client.query({ query: `SELECT id, name, score, tag FROM ${TABLE} WHERE id = 6`, format: 'JSONEachRow' })
  assert.deepEqual(await rs.json(), [{ id: '6', name: 'six', score: null, tag: null }])
})

await check('query(): {min:Int64} and {name:String} params, JSONEachRow, 64-bit ints as strings', async () => {
  const rs = await client.query({
    query: `SELECT id, name, score, tag FROM ${TABLE} WHERE id > {min:Int64} AND name = {name:String} ORDER BY id`,
    format: 'JSONEachRow',
    query_params: { min: 1, name: NAME },
  })
  assert.equal(rs.response_headers['x-clickhouse-format'], 'JSONEachRow')
  assert.deepEqual(await rs.json(), [
    { id: '2', name: NAME, score: 2.25, tag: null },
    { id: '3', name: NAME, score: null, tag: 'c' },
  ])
})

await check('query(): String param with quotes, tab, newline, backslash and UTF-8 round-trips', async () => {
  const rs = await client.query({
    query: 'SELECT {s:String} AS s, length({s:String}) AS n',
    format: 'JSONEachRow',
    query_params: { s: TRICKY },
  })
  assert.deepEqual(await rs.json(), [{ s: TRICKY, n: String([...TRICKY].length) }])
})

await check('query(): {ids:Array(Int64)} via json_each', async () => {
  const rs = await client.query({
    query: `SELECT id FROM ${TABLE} WHERE id IN (SELECT value FROM json_each({ids:Array(Int64)})) ORDER BY id`,
    format: 'JSONEachRow',
    query_params: { ids: [1, 3, 99] },
  })
  assert.deepEqual(await rs.json(), [{ id: '1' }, { id: '3' }])
})

await check('query(): {names:Array(String)} with quotes, tab and UTF-8', async () => {
  const rs = await client.query({
    query: `SELECT id FROM ${TABLE} WHERE name IN (SELECT value FROM json_each({names:Array(String)})) ORDER BY id`,
    format: 'JSONEachRow',
    query_params: { names: [NAME, 'four', TRICKY] },
  })
  assert.deepEqual(await rs.json(), [{ id: '2' }, { id: '3' }, { id: '4' }, { id: '5' }])
})

await check('query(): empty Array param', async () => {
  const rs = await client.query({
    query: `SELECT count(*) AS n FROM ${TABLE} WHERE id IN (SELECT value FROM json_each({ids:Array(Int64)}))`,
    format: 'JSONEachRow',
    query_params: { ids: [] },
  })
  assert.deepEqual(await rs.json(), [{ n: '0' }])
})

await check('query(): {tag:Nullable(String)} with null and with a value', async () => {
  const q = `SELECT id FROM ${TABLE} WHERE tag IS {tag:Nullable(String)} ORDER BY id`
  const withNull = await client.query({ query: q, format: 'JSONEachRow', query_params: { tag: null } })
  assert.deepEqual(await withNull.json(), [{ id: '2' }, { id: '6' }])
  const withValue = await client.query({ query: q, format: 'JSONEachRow', query_params: { tag: 'c' } })
  assert.deepEqual(await withValue.json(), [{ id: '3' }])
  const bare = await client.query({ query: 'SELECT {v:Nullable(Int64)} AS v', format: 'JSONEachRow', query_params: { v: null } })
  assert.deepEqual(await bare.json(), [{ v: null }])
})

await check('query(): Bool, Float64 and DateTime (JS Date) params', async () => {
  const rs = await client.query({
    query: 'SELECT {b:Bool} AS b, {f:Float64} AS f, {d:DateTime} AS d',
    format: 'JSONEachRow',
    query_params: { b: true, f: 0.125, d: new Date(Date.UTC(2023, 10, 14, 22, 13, 20)) },
  })
  assert.deepEqual(await rs.json(), [{ b: '1', f: 0.125, d: '2023-11-14 22:13:20' }])
})

await check('query(): format JSON — meta, data, rows, statistics', async () => {
  const rs = await client.query({
    query: `SELECT id, name, score FROM ${TABLE} WHERE id <= {max:Int64} ORDER BY id`,
    format: 'JSON',
    query_params: { max: 2 },
  })
  const j = await rs.json()
  assert.deepEqual(j.meta, [
    { name: 'id', type: 'Int64' },
    { name: 'name', type: 'String' },
    { name: 'score', type: 'Float64' },
  ])
  assert.deepEqual(j.data, [
    { id: '1', name: 'one', score: 1.5 },
    { id: '2', name: NAME, score: 2.25 },
  ])
  assert.equal(j.rows, 2)
  assert.equal(typeof j.statistics?.elapsed, 'number', `statistics: ${JSON.stringify(j.statistics)}`)
  assert.equal(j.statistics.rows_read, 2)
})

await check('query(): JSONCompactEachRow and CSV/TabSeparated as text', async () => {
  const compact = await client.query({ query: `SELECT id, tag FROM ${TABLE} WHERE id IN (1, 2) ORDER BY id`, format: 'JSONCompactEachRow' })
  assert.deepEqual(await compact.json(), [['1', 'a'], ['2', null]])
  const csv = await client.query({ query: `SELECT id, tag FROM ${TABLE} WHERE id IN (1, 2) ORDER BY id`, format: 'CSV' })
  assert.equal(await csv.text(), '1,"a"\n2,\\N\n')
  const tsv = await client.query({ query: `SELECT id, name FROM ${TABLE} WHERE id = 2`, format: 'TabSeparated' })
  // TabSeparated escapes ' as \' (as ClickHouse does) and tab as \t.
  assert.equal(await tsv.text(), `2\tit\\'s a "test"\\t日本語\n`)
})

await check('query(): clickhouse_settings output_format_json_quote_64bit_integers: 0 gives numbers', async () => {
  const rs = await client.query({
    query: `SELECT id, score FROM ${TABLE} WHERE id <= 2 ORDER BY id`,
    format: 'JSONEachRow',
    clickhouse_settings: { output_format_json_quote_64bit_integers: 0 },
  })
  assert.deepEqual(await rs.json(), [{ id: 1, score: 1.5 }, { id: 2, score: 2.25 }])
})

await check('query(): query_id round-trips and the summary header is sent', async () => {
  const query_id = `js-${Date.now()}`
  const rs = await client.query({ query: 'SELECT 1 AS one', format: 'JSONEachRow', query_id })
  assert.equal(rs.query_id, query_id)
  assert.equal(rs.response_headers['x-clickhouse-query-id'], query_id)
  assert.ok(rs.response_headers['x-clickhouse-summary'], 'no X-ClickHouse-Summary header')
  assert.deepEqual(await rs.json(), [{ one: 1 }])
})

await check('query(): stream() a multi-megabyte JSONEachRow result', async () => {
  const N = 200_000
  const rs = await client.query({
    query: 'WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {n:UInt32}) SELECT x FROM c',
    format: 'JSONEachRow',
    query_params: { n: N },
  })
  let count = 0
  let sum = 0
  for await (const rows of rs.stream()) {
    for (const row of rows) {
      count++
      sum += Number(row.json().x)
    }
  }
  assert.equal(count, N)
  assert.equal(sum, (N * (N + 1)) / 2)
  return `${count} rows`
})

await check('exec(): full SQL with its own FORMAT, read the raw stream', async () => {
  const r = await client.exec({ query: `SELECT count(*) AS n FROM ${TABLE} FORMAT TabSeparated` })
  let text = ''
  for await (const chunk of r.stream) text += chunk
  assert.equal(text, '6\n')
})

await check('command(): UPDATE with a param reports written_rows', async () => {
  const r = await client.command({
    query: `UPDATE ${TABLE} SET score = score * 2 WHERE id >= {min:Int64}`,
    query_params: { min: 4 },
  })
  // ids 4, 5 and 6
  assert.equal(r.summary?.written_rows, '3', `summary: ${JSON.stringify(r.summary)}`)
})

await check('error: bad SQL rejects with ClickHouseError carrying the server message', async () => {
  const sql = 'SELEC id FROM js_items'
  // The client appends "\nFORMAT JSONEachRow"; ask the server for its own message for that text.
  const server = await serverError(`${sql} \nFORMAT JSONEachRow`)
  const err = await rejection(client.query({ query: sql, format: 'JSONEachRow' }))
  assert.ok(err instanceof ClickHouseError, `not a ClickHouseError: ${err?.stack ?? err}`)
  assert.equal(err.code, server.code)
  assert.equal(err.type, 'SYNTAX_ERROR')
  assert.ok(err.message.includes(server.message), `client message ${JSON.stringify(err.message)} does not contain the server message ${JSON.stringify(server.message)}`)
  return `code ${err.code}: ${err.message.trim()}`
})

await check('error: unknown table in command() rejects with the server message', async () => {
  const sql = 'DELETE FROM no_such_table'
  const server = await serverError(sql)
  const err = await rejection(client.command({ query: sql }))
  assert.ok(err instanceof ClickHouseError, `not a ClickHouseError: ${err?.stack ?? err}`)
  assert.equal(err.code, server.code)
  assert.equal(err.type, 'UNKNOWN_TABLE')
  assert.ok(err.message.includes(server.message), `client message ${JSON.stringify(err.message)} does not contain ${JSON.stringify(server.message)}`)
  return `code ${err.code}: ${err.message.trim()}`
})

await check('error: bad Int64 param value rejects with the server message', async () => {
  const err = await rejection(client.query({ query: 'SELECT {n:Int64} AS n', format: 'JSONEachRow', query_params: { n: 'abc' } }))
  assert.ok(err instanceof ClickHouseError, `not a ClickHouseError: ${err?.stack ?? err}`)
  const server = await serverError('SELECT {n:Int64} AS n \nFORMAT JSONEachRow', { param_n: 'abc' })
  assert.equal(err.code, server.code)
  assert.ok(err.message.includes(server.message), `client message ${JSON.stringify(err.message)} does not contain ${JSON.stringify(server.message)}`)
  return `code ${err.code}`
})

await check('error: insert into a missing table rejects', async () => {
  const err = await rejection(client.insert({ table: 'no_such_table', format: 'JSONEachRow', values: [{ id: 1 }] }))
  assert.ok(err instanceof ClickHouseError, `not a ClickHouseError: ${err?.stack ?? err}`)
  assert.match(err.message, /no_such_table/)
  return `code ${err.code}`
})

await check('compression.response: true (enable_http_compression=1, Accept-Encoding: gzip) still reads results', async () => {
  const c = createClient({ url, ...auth, compression: { response: true }, log: { level: 127 } })
  try {
    const rs = await c.query({ query: `SELECT id FROM ${TABLE} WHERE id = 1`, format: 'JSONEachRow' })
    const enc = rs.response_headers['content-encoding']
    assert.deepEqual(await rs.json(), [{ id: '1' }])
    return `response Content-Encoding: ${enc ?? 'none (server does not compress)'}`
  } finally {
    await c.close()
  }
})

// ---- Client features probed for the report. They print what happened and never fail the run;
// ---- a change in behaviour shows up in the output.

async function probe(name, fn) {
  try {
    const detail = await fn()
    console.log(`probe ${name}: WORKS${detail ? ` (${detail})` : ''}`)
  } catch (e) {
    const msg = String(e?.message ?? e).trim().split('\n')[0].slice(0, 300)
    console.log(`probe ${name}: DOES NOT WORK: ${e?.constructor?.name ?? 'Error'}${e?.code ? ` code ${e.code}` : ''}: ${msg}`)
  }
}

await probe('compression.request: true (gzip-compressed insert body, Content-Encoding: gzip)', async () => {
  const c = createClient({ url, ...auth, compression: { request: true }, log: { level: 127 } })
  try {
    await c.insert({ table: TABLE, format: 'JSONEachRow', values: [{ id: 100, name: 'gz' }] })
    const rs = await client.query({ query: `SELECT name FROM ${TABLE} WHERE id = 100`, format: 'JSONEachRow' })
    assert.deepEqual(await rs.json(), [{ name: 'gz' }])
  } finally {
    await c.close()
  }
})

await probe('use_multipart_params: true (query and param_* as multipart/form-data body)', async () => {
  const c = createClient({ url, ...auth, use_multipart_params: true, log: { level: 127 } })
  try {
    const rs = await c.query({ query: 'SELECT {n:Int64} AS n', format: 'JSONEachRow', query_params: { n: 7 } })
    assert.deepEqual(await rs.json(), [{ n: '7' }])
  } finally {
    await c.close()
  }
})

await probe('session_id (query with session_id=...)', async () => {
  const rs = await client.query({ query: 'SELECT 1 AS one', format: 'JSONEachRow', session_id: 'js-session' })
  assert.deepEqual(await rs.json(), [{ one: 1 }])
})

await probe('database: "main" in createClient', async () => {
  const c = createClient({ url, ...auth, database: 'main', log: { level: 127 } })
  try {
    const rs = await c.query({ query: 'SELECT 1 AS one', format: 'JSONEachRow' })
    assert.deepEqual(await rs.json(), [{ one: 1 }])
  } finally {
    await c.close()
  }
})

await probe('error after streaming began is reported with the server message', async () => {
  // 300k rows stream past the server's 1 MiB buffer; row 290000 raises "integer overflow".
  const rs = await client.query({
    query:
      'WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000) ' +
      'SELECT x, abs(CASE WHEN x < 290000 THEN x ELSE -9223372036854775807 - 1 END) AS y FROM c',
    format: 'JSONEachRow',
  })
  let count = 0
  let err
  try {
    for await (const rows of rs.stream()) {
      for (const row of rows) {
        row.json()
        count++
      }
    }
  } catch (e) {
    err = e
  }
  assert.ok(err, `the stream ended without an error after ${count} rows`)
  assert.ok(/integer overflow/.test(err.message), `got ${count} rows, then ${err.constructor.name}: ${err.message} (no server message)`)
  return `${count} rows, then ${err.message}`
})

await client.close()
console.log(`\n${passed} passed, ${failed} failed`)
if (failed > 0) {
  console.error(`clickhouse-js interop: ${failed} check(s) failed`)
  process.exit(1)
}
