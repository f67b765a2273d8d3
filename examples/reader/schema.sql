-- The reader app's tables. Every row has an owner (the user id); users reach their rows only
-- through the my_reader_* policy views (policies.json). Safe to apply again: only adds.
CREATE TABLE IF NOT EXISTS reader_settings (
  owner TEXT PRIMARY KEY,
  email TEXT NOT NULL,                       -- where digests and the evening message go
  reply_to TEXT,                             -- the inbound address replies (feedback) come back to
  tz TEXT NOT NULL DEFAULT 'UTC',            -- IANA time zone of the daily run
  feeds TEXT NOT NULL DEFAULT '[]',          -- JSON [{url, kind = 'rss' (RSS or Atom) | 'links', token?}]
  chat_provider TEXT,                        -- telegram | slack | discord (optional)
  chat_id TEXT,
  digest_size INTEGER NOT NULL DEFAULT 5,
  evening TEXT NOT NULL DEFAULT '21:30',     -- local time of the wind-down message
  updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now'))
);
CREATE TABLE IF NOT EXISTS reader_items (
  id INTEGER PRIMARY KEY,
  owner TEXT NOT NULL,
  kind TEXT NOT NULL,                        -- rss | atom | links | newsletter
  source TEXT NOT NULL,                      -- the feed URL or the newsletter's sender
  url TEXT NOT NULL,                         -- the link (newsletters: mid:<Message-ID>)
  title TEXT NOT NULL,
  summary TEXT NOT NULL DEFAULT '',
  tags TEXT NOT NULL DEFAULT '[]',           -- JSON list of lower-case topics
  day TEXT,                                  -- the digest day it was ranked in (NULL: not yet)
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
  UNIQUE (owner, url)
);
CREATE TABLE IF NOT EXISTS reader_digests (
  id INTEGER PRIMARY KEY,
  owner TEXT NOT NULL,
  day TEXT NOT NULL,
  flow_id TEXT,                              -- the day's workflow (feedback is signalled to it)
  generation TEXT,                           -- the ai generation that ranked it
  ranking TEXT NOT NULL,                     -- JSON [{id, score, reason}] best first (the digest: the first digest_size)
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
  UNIQUE (owner, day)
);
CREATE TABLE IF NOT EXISTS reader_feedback (
  id INTEGER PRIMARY KEY,
  owner TEXT NOT NULL,
  digest INTEGER NOT NULL,
  item INTEGER NOT NULL,
  verdict INTEGER NOT NULL CHECK (verdict IN (-1, 1)),
  via TEXT NOT NULL,                         -- dashboard | email | chat
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
  UNIQUE (owner, item)
);
CREATE INDEX IF NOT EXISTS reader_items_undelivered ON reader_items (owner, day);
