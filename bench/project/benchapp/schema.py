"""The benchmark's one table, created by bench/run.py (no migrations to run)."""

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS bench_item (id serial PRIMARY KEY, name text NOT NULL, value integer NOT NULL);
TRUNCATE bench_item;
INSERT INTO bench_item (name, value) SELECT 'item ' || i, i % 100 FROM generate_series(1, 1000) AS i;
ANALYZE bench_item;
"""
