"""The schema: numbered migrations, each run once, in order, in one transaction.

A migration is SQL; 4 also needs Python (people's keywords move out of the model's answers
into decisions, and the current keyword sets are computed), which db.Store runs after the SQL
of every migration due.
Never edit a migration that has shipped: add the next one.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: the first schema
    """
    CREATE TABLE images (
        content_id TEXT PRIMARY KEY,
        size INTEGER,
        width INTEGER,
        height INTEGER,
        first_seen TEXT NOT NULL
    );
    CREATE TABLE files (
        path TEXT PRIMARY KEY,
        content_id TEXT NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        present INTEGER NOT NULL DEFAULT 1,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL
    );
    CREATE INDEX files_content_id ON files(content_id);
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        status TEXT NOT NULL DEFAULT 'running',
        backend TEXT NOT NULL,
        model TEXT NOT NULL,
        prompt_key TEXT NOT NULL,
        params TEXT NOT NULL,
        counts TEXT,
        timings TEXT
    );
    CREATE TABLE annotations (
        id INTEGER PRIMARY KEY,
        content_id TEXT NOT NULL,
        backend TEXT NOT NULL,
        model TEXT NOT NULL,
        prompt_key TEXT NOT NULL,
        language TEXT,
        description TEXT,
        raw TEXT,
        server_timings TEXT,
        run_id INTEGER REFERENCES runs(id),
        created_at TEXT NOT NULL,
        UNIQUE (content_id, backend, model, prompt_key)
    );
    CREATE TABLE tags (
        annotation_id INTEGER NOT NULL REFERENCES annotations(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        tag TEXT NOT NULL,
        confidence REAL,
        source TEXT NOT NULL DEFAULT 'model',
        PRIMARY KEY (annotation_id, tag)
    );
    CREATE INDEX tags_tag ON tags(tag);
    CREATE TABLE failures (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL,
        content_id TEXT,
        backend TEXT NOT NULL,
        model TEXT NOT NULL,
        prompt_key TEXT NOT NULL,
        stage TEXT NOT NULL,
        reason TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 1,
        run_id INTEGER REFERENCES runs(id),
        last_at TEXT NOT NULL,
        UNIQUE (path, backend, model, prompt_key)
    );
    """,
    # 2: what people change in the vocabulary, and text embeddings for semantic search
    """
    CREATE TABLE tag_edits (
        id INTEGER PRIMARY KEY,
        action TEXT NOT NULL,
        old TEXT NOT NULL,
        new TEXT,
        created_at TEXT NOT NULL
    );
    CREATE TABLE embeddings (
        annotation_id INTEGER PRIMARY KEY REFERENCES annotations(id) ON DELETE CASCADE,
        model TEXT NOT NULL,
        text_hash TEXT NOT NULL,
        dim INTEGER NOT NULL,
        vector BLOB NOT NULL
    );
    """,
    # 3: full-text search (library/search.py). CJK text goes in one character per token, so
    # the default tokenizer finds 1- and 2-character words. Rows already there are indexed by the
    # first search (the split needs Python), which the 'rebuild' mark asks for.
    """
    CREATE VIRTUAL TABLE search_index USING fts5(
        tags, description, tagkeys, tokenize = 'unicode61 remove_diacritics 2'
    );
    CREATE TABLE search_meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    INSERT INTO search_meta (key, value)
        SELECT 'rebuild', 'migration 3' WHERE EXISTS (SELECT 1 FROM annotations);
    """,
    # 4: keywords belong to the image, decisions belong to people. An annotation keeps what a
    # model said; a decision what a person said of one content (in one language, or '' for
    # all; `follows` names the decision a vocabulary edit carried along, so undoing that one
    # undoes its followers too). keyword_sets hold what every reader shows: for each content,
    # language and model, the newest annotation's keywords with the decisions applied
    # (library/current.py keeps them). The search index and the embeddings follow the sets.
    # Runs say which process ran them, so one left "running" by a kill -9 is closed by the
    # next open. Content ids are now hashed without the metadata photo tools rewrite
    # (ingest/files.py); files hashed before keep their whole-file id until they change, and
    # `whole_file_id` marks them so people's decisions follow such a file's first rewrite.
    """
    CREATE TABLE decisions (
        id INTEGER PRIMARY KEY,
        content_id TEXT NOT NULL,
        language TEXT NOT NULL DEFAULT '',
        action TEXT NOT NULL CHECK (action IN ('add', 'reject', 'describe', 'undo')),
        keyword TEXT,
        keyword_key TEXT,
        description TEXT,
        undoes INTEGER REFERENCES decisions(id),
        follows INTEGER REFERENCES decisions(id),
        author TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX decisions_content ON decisions(content_id, id);
    CREATE INDEX decisions_key ON decisions(keyword_key);
    CREATE TABLE keyword_sets (
        id INTEGER PRIMARY KEY,
        content_id TEXT NOT NULL,
        language TEXT NOT NULL,
        backend TEXT NOT NULL,
        model TEXT NOT NULL,
        annotation_id INTEGER,
        created_at TEXT NOT NULL,
        newest_in_language INTEGER NOT NULL DEFAULT 0,
        newest INTEGER NOT NULL DEFAULT 0,
        description TEXT,
        described_by TEXT,
        text_hash TEXT NOT NULL,
        UNIQUE (content_id, language, backend, model)
    );
    CREATE INDEX keyword_sets_newest ON keyword_sets(content_id) WHERE newest = 1;
    CREATE INDEX keyword_sets_language ON keyword_sets(language, content_id)
        WHERE newest_in_language = 1;
    CREATE INDEX keyword_sets_model ON keyword_sets(model, content_id);
    CREATE TABLE set_keywords (
        set_id INTEGER NOT NULL REFERENCES keyword_sets(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        keyword TEXT NOT NULL,
        key TEXT NOT NULL,
        source TEXT NOT NULL,
        confidence REAL,
        PRIMARY KEY (set_id, position)
    ) WITHOUT ROWID;
    CREATE INDEX set_keywords_key ON set_keywords(key);
    DROP TABLE embeddings;
    CREATE TABLE embeddings (
        text_hash TEXT NOT NULL,
        model TEXT NOT NULL,
        dim INTEGER NOT NULL,
        vector BLOB NOT NULL,
        PRIMARY KEY (text_hash, model)
    ) WITHOUT ROWID;
    DELETE FROM search_index;
    DELETE FROM search_meta WHERE key = 'rebuild';
    CREATE INDEX failures_content ON failures(content_id);
    ALTER TABLE runs ADD COLUMN pid INTEGER;
    ALTER TABLE runs ADD COLUMN host TEXT;
    ALTER TABLE runs ADD COLUMN stopped_reason TEXT;
    ALTER TABLE files ADD COLUMN whole_file_id INTEGER NOT NULL DEFAULT 0;
    UPDATE files SET whole_file_id = 1;
    """,
    # 5: the web app's grid at size: present files by content (covering), the newest sets
    # in time order (newest-first pages without sorting the library)
    """
    CREATE INDEX files_present_content ON files(content_id, path) WHERE present = 1;
    CREATE INDEX keyword_sets_newest_time ON keyword_sets(created_at, id) WHERE newest = 1;
    """,
    # 6: the grid sorted by how many keywords an image has, without counting them per page;
    # files marked once their content has keyword sets (library/current.py keeps the mark),
    # so the few never tagged are found by an index, not by probing every file
    """
    ALTER TABLE keyword_sets ADD COLUMN keyword_count INTEGER NOT NULL DEFAULT 0;
    UPDATE keyword_sets SET keyword_count =
        (SELECT count(*) FROM set_keywords k WHERE k.set_id = keyword_sets.id);
    CREATE INDEX keyword_sets_newest_count ON keyword_sets(keyword_count, id) WHERE newest = 1;
    ALTER TABLE files ADD COLUMN tagged INTEGER NOT NULL DEFAULT 0;
    UPDATE files SET tagged = 1
        WHERE content_id IN (SELECT content_id FROM keyword_sets WHERE newest = 1);
    CREATE INDEX files_untagged ON files(path) WHERE present = 1 AND tagged = 0;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
# Migrations whose SQL is followed by a Python step. db.Store runs the steps after the SQL of
# every due migration, in the same transaction: a step is today's code and writes today's
# schema (a later migration must not take away what a step reads).
PYTHON_STEPS = frozenset({4})
