"""Interop: the official ClickHouse Python client (clickhouse-connect) against ichibase.

Usage: python client_test.py <server url>; ICHIBASE_KEY holds the admin API key. Prints one line
per check; exits non-zero on the first failure. Run by tests/clickhouse_python.rs.
"""

import datetime
import os
import sys
from urllib.parse import urlparse

import clickhouse_connect
import pandas as pd

url = urlparse(sys.argv[1])
key = os.environ.get("ICHIBASE_KEY", "")


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


def connect(**kw):
    # The client's defaults: session_id, compression (lz4 inserts, Accept-Encoding), Native.
    return clickhouse_connect.get_client(
        host=url.hostname, port=url.port, username="default", password=key, **kw
    )


client = connect()
check("connect: version() and timezone() probe", client.server_version == "24.8.0.0", client.server_version)
check("connect: system.settings read", "max_result_rows" in client.server_settings, list(client.server_settings)[:5])
check("connect: compression negotiated", client.compression is not None, client.compression)

# command
check("command SELECT 1", client.command("SELECT 1") == 1)
check("command currentDatabase()", client.command("SELECT currentDatabase()") == "default")
client.command("DROP TABLE IF EXISTS py_t")
client.command(
    "CREATE TABLE py_t (id INTEGER PRIMARY KEY, name TEXT, score REAL, flag INTEGER NOT NULL DEFAULT 0)"
)
check("command EXISTS TABLE", client.command("EXISTS TABLE py_t") == 1)
check("command SHOW TABLES", "py_t" in str(client.command("SHOW TABLES")))

# query with typed results
r = client.query("SELECT 1 AS one, 'x' AS s, 2.5 AS f, -3 AS neg")
check("query literal types", [t.name for t in r.column_types] == ["UInt8", "Nullable(String)", "Nullable(Float64)", "Int8"],
      [t.name for t in r.column_types])
check("query literal values", r.result_rows == [(1, "x", 2.5, -3)], r.result_rows)

# insert (Native, lz4-compressed by default)
rows = [[1, "alpha", 1.5, 1], [2, None, None, 0], [3, "gamma \u2603", -0.25, 1]]
summary = client.insert("py_t", rows, column_names=["id", "name", "score", "flag"])
check("insert Native rows", summary.written_rows == 3, summary.written_rows)
r = client.query("SELECT id, name, score, flag FROM py_t ORDER BY id")
check("query typed rows", r.result_rows == [(1, "alpha", 1.5, 1), (2, None, None, 0), (3, "gamma \u2603", -0.25, 1)], r.result_rows)
check("query column types", [t.name for t in r.column_types] == ["Nullable(Int64)", "Nullable(String)", "Nullable(Float64)", "Nullable(Int64)"],
      [t.name for t in r.column_types])

# insert with all columns from DESCRIBE (no column_names)
client.insert("py_t", [[4, "delta", 4.0, 0]])
check("insert via DESCRIBE TABLE", client.command("SELECT count(*) FROM py_t") == 4)

# server-side parameters
r = client.query("SELECT name FROM py_t WHERE id = {id:Int64} OR name = {n:String} ORDER BY id",
                 parameters={"id": 1, "n": "delta"})
check("server-side parameters", r.result_rows == [("alpha",), ("delta",)], r.result_rows)

# query_df (pandas)
df = client.query_df("SELECT id, name, score FROM py_t ORDER BY id")
check("query_df shape", df.shape == (4, 3), df.shape)
check("query_df values", list(df["id"]) == [1, 2, 3, 4] and df["name"][0] == "alpha" and pd.isna(df["name"][1]), df)

# insert_df
client.insert_df("py_t", pd.DataFrame({"id": [5, 6], "name": ["e", "f"], "score": [5.5, 6.5], "flag": [1, 1]}))
check("insert_df", client.command("SELECT count(*) FROM py_t") == 6)

# streaming 100k rows
client.command("DROP TABLE IF EXISTS py_big")
client.command("CREATE TABLE py_big (n INTEGER, s TEXT)")
batch = [[i, f"row {i}"] for i in range(100_000)]
client.insert("py_big", batch, column_names=["n", "s"])
total = 0
count = 0
blocks = 0
with client.query_row_block_stream("SELECT n, s FROM py_big ORDER BY n") as stream:
    for block in stream:
        blocks += 1
        for n, s in block:
            total += n
            count += 1
check("query_row_block_stream 100k rows", count == 100_000 and total == sum(range(100_000)), (count, total, blocks))

# system tables and DESCRIBE
r = client.query("SELECT name, type FROM system.columns WHERE table = 'py_t' ORDER BY position")
check("system.columns", r.result_rows[0] == ("id", "Nullable(Int64)"), r.result_rows)
r = client.query("DESCRIBE TABLE py_t")
check("DESCRIBE TABLE", [row[0] for row in r.result_rows] == ["id", "name", "score", "flag"], r.result_rows)
check("system.tables", client.command("SELECT count(*) FROM system.tables WHERE name = 'py_big'") == 1)

# sessions: session_check needs an existing session
s = connect(session_id="py-session-1")
check("explicit session", s.command("SELECT 1") == 1)

# without compression, and with RowBinary-style raw formats
plain = connect(compress=False)
check("compress=False query", plain.query("SELECT count(*) FROM py_big").result_rows == [(100_000,)])
raw = plain.raw_query("SELECT 1 AS a FORMAT RowBinaryWithNamesAndTypes")
check("raw RowBinaryWithNamesAndTypes", raw == b"\x01\x01a\x05UInt8\x01", raw)
raw = plain.raw_query("SELECT 1 AS a, 'x' AS b FORMAT JSONEachRow")
check("JSONEachRow UInt8 unquoted", raw.strip() == b'{"a":1,"b":"x"}', raw)

# gzip-compressed, both ways
gz = connect(compress="gzip")
gz.insert("py_t", [[7, "gz", 7.0, 0]], column_names=["id", "name", "score", "flag"])
check("gzip insert and query", gz.query("SELECT name FROM py_t WHERE id = 7").result_rows == [("gz",)])

# errors keep their ClickHouse code
try:
    client.query("SELECT * FROM no_such_table")
    check("unknown table error", False, "no error")
except Exception as e:  # DatabaseError
    check("unknown table error", "60" in str(e), str(e))

client.command("DROP TABLE py_big")
client.close()
print("all checks passed")
