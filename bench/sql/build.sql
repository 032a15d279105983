-- Runbook-shaped benchmark database (DEDUPLICATION_FIX_SUMMARY.md), built in bulk.
-- Run with: psql -X -v ON_ERROR_STOP=1 -v scale=0.1 -f bench/sql/build.sql
--
-- Every child table: id bigserial PRIMARY KEY, natural-key columns, payload (text, int, jsonb),
-- created_at increasing with id, an index on the parent FK column and one on created_at.
-- Row i (0-based) carries unique key k = i % U, so the table looks like U keys re-inserted by
-- N / U ETL runs; the oldest copy of key k is id k + 1. Copies are exact for key + payload.
-- Row and unique-key counts are the runbook's, times :scale (at least 1).
\set ON_ERROR_STOP on
SET client_min_messages = warning;
DROP SCHEMA IF EXISTS breezeway CASCADE;
CREATE SCHEMA breezeway;

-- The sizes, in one place: rows and unique keys at scale 1 (task_tags: unique, 2 tags per task).
CREATE TABLE breezeway.bench_spec (tbl text PRIMARY KEY, parent text NOT NULL, n bigint NOT NULL, u bigint NOT NULL);
INSERT INTO breezeway.bench_spec (tbl, parent, n, u)
SELECT tbl, parent, greatest(1, round(n * :scale))::bigint, greatest(1, round(u * :scale))::bigint
FROM (VALUES
    ('task_requirements',  'tasks',        24174099, 26580),
    ('property_photos',    'properties',   10192750, 16113),
    ('reservation_guests', 'reservations',  1763359, 1763359),
    ('task_assignments',   'tasks',         1485262, 1000),
    ('task_photos',        'tasks',          715312, 26000),
    ('task_comments',      'tasks',           14664, 470),
    ('task_tags',          'tasks',           52000, 52000),
    ('tasks',              '',                26000, 26000),
    ('properties',         '',                 4000, 4000),
    ('reservations',       '',               900000, 900000)
) AS v (tbl, parent, n, u);

-- Parents.
CREATE TABLE breezeway.properties (
    id bigint PRIMARY KEY, name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE breezeway.tasks (
    id bigint PRIMARY KEY, property_pk bigint REFERENCES breezeway.properties (id), title text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE breezeway.reservations (
    id bigint PRIMARY KEY, property_pk bigint REFERENCES breezeway.properties (id), guest_count int,
    created_at timestamptz NOT NULL DEFAULT now());

INSERT INTO breezeway.properties (id, name, created_at)
SELECT g, 'property ' || g, timestamptz '2024-01-01' + g * interval '1 minute'
FROM breezeway.bench_spec s, generate_series(1, s.n) g WHERE s.tbl = 'properties';
INSERT INTO breezeway.tasks (id, property_pk, title, created_at)
SELECT g, g % p.n + 1, 'task ' || g, timestamptz '2024-01-01' + g * interval '1 second'
FROM breezeway.bench_spec s, breezeway.bench_spec p, generate_series(1, s.n) g
WHERE s.tbl = 'tasks' AND p.tbl = 'properties';
INSERT INTO breezeway.reservations (id, property_pk, guest_count, created_at)
SELECT g, g % p.n + 1, 1 + g % 4, timestamptz '2024-01-01' + g * interval '1 second'
FROM breezeway.bench_spec s, breezeway.bench_spec p, generate_series(1, s.n) g
WHERE s.tbl = 'reservations' AND p.tbl = 'properties';

-- Children (FK and secondary indexes are added after the bulk load).
CREATE TABLE breezeway.task_requirements (
    id bigserial PRIMARY KEY, task_pk bigint NOT NULL, requirement_id bigint NOT NULL,
    label text, value int, attrs jsonb, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE breezeway.property_photos (
    id bigserial PRIMARY KEY, property_pk bigint NOT NULL, photo_id bigint NOT NULL,
    label text, value int, attrs jsonb, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE breezeway.reservation_guests (
    id bigserial PRIMARY KEY, reservation_pk bigint NOT NULL, guest_id bigint NOT NULL,
    label text, value int, attrs jsonb, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE breezeway.task_assignments (
    id bigserial PRIMARY KEY, task_pk bigint NOT NULL, assignee_id bigint NOT NULL,
    label text, value int, attrs jsonb, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE breezeway.task_photos (
    id bigserial PRIMARY KEY, task_pk bigint NOT NULL, photo_id bigint NOT NULL,
    label text, value int, attrs jsonb, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE breezeway.task_comments (
    id bigserial PRIMARY KEY, task_pk bigint NOT NULL, comment_id bigint NOT NULL,
    label text, value int, attrs jsonb, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE breezeway.task_tags (
    id bigserial PRIMARY KEY, task_pk bigint NOT NULL, tag_pk bigint NOT NULL,
    label text, value int, attrs jsonb, created_at timestamptz NOT NULL DEFAULT now());

-- One generator per table; k = i % u is the unique key, payload depends on k only.
INSERT INTO breezeway.task_requirements (id, task_pk, requirement_id, label, value, attrs, created_at)
SELECT i + 1, (i % s.u) % p.n + 1, (i % s.u) + 1,
       'requirement ' || (i % s.u) || ': check the linen closet and restock supplies', ((i % s.u) % 997)::int,
       jsonb_build_object('k', i % s.u, 'src', 'etl', 'required', (i % s.u) % 2 = 0),
       timestamptz '2025-01-01' + i * interval '10 ms'
FROM breezeway.bench_spec s, breezeway.bench_spec p, generate_series(0, s.n - 1) i
WHERE s.tbl = 'task_requirements' AND p.tbl = 'tasks';
INSERT INTO breezeway.property_photos (id, property_pk, photo_id, label, value, attrs, created_at)
SELECT i + 1, (i % s.u) % p.n + 1, (i % s.u) + 1,
       'https://cdn.example.com/photos/' || (i % s.u) || '/original.jpg', ((i % s.u) % 997)::int,
       jsonb_build_object('k', i % s.u, 'src', 'etl', 'w', 1024, 'h', 768),
       timestamptz '2025-01-01' + i * interval '10 ms'
FROM breezeway.bench_spec s, breezeway.bench_spec p, generate_series(0, s.n - 1) i
WHERE s.tbl = 'property_photos' AND p.tbl = 'properties';
INSERT INTO breezeway.reservation_guests (id, reservation_pk, guest_id, label, value, attrs, created_at)
SELECT i + 1, (i % s.u) % p.n + 1, (i % s.u) + 1,
       'guest ' || (i % s.u) || ' <guest' || (i % s.u) || '@example.com>', ((i % s.u) % 997)::int,
       jsonb_build_object('k', i % s.u, 'src', 'etl', 'adult', true),
       timestamptz '2025-01-01' + i * interval '10 ms'
FROM breezeway.bench_spec s, breezeway.bench_spec p, generate_series(0, s.n - 1) i
WHERE s.tbl = 'reservation_guests' AND p.tbl = 'reservations';
INSERT INTO breezeway.task_assignments (id, task_pk, assignee_id, label, value, attrs, created_at)
SELECT i + 1, (i % s.u) % p.n + 1, (i % s.u) + 1,
       'assignee ' || (i % s.u) || ' (housekeeping)', ((i % s.u) % 997)::int,
       jsonb_build_object('k', i % s.u, 'src', 'etl', 'role', 'cleaner'),
       timestamptz '2025-01-01' + i * interval '10 ms'
FROM breezeway.bench_spec s, breezeway.bench_spec p, generate_series(0, s.n - 1) i
WHERE s.tbl = 'task_assignments' AND p.tbl = 'tasks';
INSERT INTO breezeway.task_photos (id, task_pk, photo_id, label, value, attrs, created_at)
SELECT i + 1, (i % s.u) % p.n + 1, (i % s.u) + 1,
       'https://cdn.example.com/tasks/' || (i % s.u) || '/after.jpg', ((i % s.u) % 997)::int,
       jsonb_build_object('k', i % s.u, 'src', 'etl', 'w', 800, 'h', 600),
       timestamptz '2025-01-01' + i * interval '10 ms'
FROM breezeway.bench_spec s, breezeway.bench_spec p, generate_series(0, s.n - 1) i
WHERE s.tbl = 'task_photos' AND p.tbl = 'tasks';
INSERT INTO breezeway.task_comments (id, task_pk, comment_id, label, value, attrs, created_at)
SELECT i + 1, (i % s.u) % p.n + 1, (i % s.u) + 1,
       'comment ' || (i % s.u) || ': door code changed, see notes', ((i % s.u) % 997)::int,
       jsonb_build_object('k', i % s.u, 'src', 'etl'),
       timestamptz '2025-01-01' + i * interval '10 ms'
FROM breezeway.bench_spec s, breezeway.bench_spec p, generate_series(0, s.n - 1) i
WHERE s.tbl = 'task_comments' AND p.tbl = 'tasks';
INSERT INTO breezeway.task_tags (id, task_pk, tag_pk, label, value, attrs, created_at)
SELECT i + 1, (i % s.u) % p.n + 1, (i % s.u) + 1,
       'tag ' || (i % s.u), ((i % s.u) % 997)::int,
       jsonb_build_object('k', i % s.u, 'src', 'etl'),
       timestamptz '2025-01-01' + i * interval '10 ms'
FROM breezeway.bench_spec s, breezeway.bench_spec p, generate_series(0, s.n - 1) i
WHERE s.tbl = 'task_tags' AND p.tbl = 'tasks';

-- Sequences continue after the loaded ids.
SELECT setval(pg_get_serial_sequence('breezeway.' || tbl, 'id'), n)
FROM breezeway.bench_spec WHERE parent <> '';

-- Foreign keys, the FK index and one more index per child table; task_tags' existing constraint.
ALTER TABLE breezeway.task_requirements ADD CONSTRAINT task_requirements_task_fk
    FOREIGN KEY (task_pk) REFERENCES breezeway.tasks (id);
ALTER TABLE breezeway.property_photos ADD CONSTRAINT property_photos_property_fk
    FOREIGN KEY (property_pk) REFERENCES breezeway.properties (id);
ALTER TABLE breezeway.reservation_guests ADD CONSTRAINT reservation_guests_reservation_fk
    FOREIGN KEY (reservation_pk) REFERENCES breezeway.reservations (id);
ALTER TABLE breezeway.task_assignments ADD CONSTRAINT task_assignments_task_fk
    FOREIGN KEY (task_pk) REFERENCES breezeway.tasks (id);
ALTER TABLE breezeway.task_photos ADD CONSTRAINT task_photos_task_fk
    FOREIGN KEY (task_pk) REFERENCES breezeway.tasks (id);
ALTER TABLE breezeway.task_comments ADD CONSTRAINT task_comments_task_fk
    FOREIGN KEY (task_pk) REFERENCES breezeway.tasks (id);
ALTER TABLE breezeway.task_tags ADD CONSTRAINT task_tags_task_fk
    FOREIGN KEY (task_pk) REFERENCES breezeway.tasks (id);
ALTER TABLE breezeway.task_tags ADD CONSTRAINT task_tags_unique UNIQUE (task_pk, tag_pk);

CREATE INDEX task_requirements_task_pk_idx ON breezeway.task_requirements (task_pk);
CREATE INDEX task_requirements_created_at_idx ON breezeway.task_requirements (created_at);
CREATE INDEX property_photos_property_pk_idx ON breezeway.property_photos (property_pk);
CREATE INDEX property_photos_created_at_idx ON breezeway.property_photos (created_at);
CREATE INDEX reservation_guests_reservation_pk_idx ON breezeway.reservation_guests (reservation_pk);
CREATE INDEX reservation_guests_created_at_idx ON breezeway.reservation_guests (created_at);
CREATE INDEX task_assignments_task_pk_idx ON breezeway.task_assignments (task_pk);
CREATE INDEX task_assignments_created_at_idx ON breezeway.task_assignments (created_at);
CREATE INDEX task_photos_task_pk_idx ON breezeway.task_photos (task_pk);
CREATE INDEX task_photos_created_at_idx ON breezeway.task_photos (created_at);
CREATE INDEX task_comments_task_pk_idx ON breezeway.task_comments (task_pk);
CREATE INDEX task_comments_created_at_idx ON breezeway.task_comments (created_at);
CREATE INDEX task_tags_task_pk_idx ON breezeway.task_tags (task_pk);
CREATE INDEX task_tags_created_at_idx ON breezeway.task_tags (created_at);

-- The spec stays out of the way of the contenders (they only know the seven child tables).
CREATE SCHEMA IF NOT EXISTS bench;
ALTER TABLE breezeway.bench_spec SET SCHEMA bench;

VACUUM ANALYZE;
