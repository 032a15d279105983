-- Contender A: the runbook's migration (migrations/010_deduplicate_child_tables.sql) as its
-- summary describes it, as plain SQL for psql -f. Backup tables, DELETE ... NOT IN (DISTINCT ON)
-- keeping the oldest row per natural key, six UNIQUE constraints, one transaction ("transaction-
-- safe"), then VACUUM FULL of the six tables (which cannot run inside a transaction block).
-- A1 runs this on default settings; A2 runs it after SET work_mem / maintenance_work_mem.
\set ON_ERROR_STOP on
\timing on
BEGIN;

-- Step 1: backup tables.
CREATE TABLE breezeway.task_requirements_backup AS SELECT * FROM breezeway.task_requirements;
CREATE TABLE breezeway.property_photos_backup AS SELECT * FROM breezeway.property_photos;
CREATE TABLE breezeway.reservation_guests_backup AS SELECT * FROM breezeway.reservation_guests;
CREATE TABLE breezeway.task_assignments_backup AS SELECT * FROM breezeway.task_assignments;
CREATE TABLE breezeway.task_photos_backup AS SELECT * FROM breezeway.task_photos;
CREATE TABLE breezeway.task_comments_backup AS SELECT * FROM breezeway.task_comments;

-- Step 2: delete duplicates, keeping the oldest row (lowest id) per natural key.
DELETE FROM breezeway.task_requirements WHERE id NOT IN (
    SELECT DISTINCT ON (task_pk, requirement_id) id FROM breezeway.task_requirements
    ORDER BY task_pk, requirement_id, id);
DELETE FROM breezeway.property_photos WHERE id NOT IN (
    SELECT DISTINCT ON (property_pk, photo_id) id FROM breezeway.property_photos
    ORDER BY property_pk, photo_id, id);
DELETE FROM breezeway.reservation_guests WHERE id NOT IN (
    SELECT DISTINCT ON (reservation_pk, guest_id) id FROM breezeway.reservation_guests
    ORDER BY reservation_pk, guest_id, id);
DELETE FROM breezeway.task_assignments WHERE id NOT IN (
    SELECT DISTINCT ON (task_pk, assignee_id) id FROM breezeway.task_assignments
    ORDER BY task_pk, assignee_id, id);
DELETE FROM breezeway.task_photos WHERE id NOT IN (
    SELECT DISTINCT ON (task_pk, photo_id) id FROM breezeway.task_photos
    ORDER BY task_pk, photo_id, id);
DELETE FROM breezeway.task_comments WHERE id NOT IN (
    SELECT DISTINCT ON (task_pk, comment_id) id FROM breezeway.task_comments
    ORDER BY task_pk, comment_id, id);

-- Step 3: UNIQUE constraints on the natural keys.
ALTER TABLE breezeway.task_requirements ADD CONSTRAINT task_requirements_unique UNIQUE (task_pk, requirement_id);
ALTER TABLE breezeway.property_photos ADD CONSTRAINT property_photos_unique UNIQUE (property_pk, photo_id);
ALTER TABLE breezeway.reservation_guests ADD CONSTRAINT reservation_guests_unique UNIQUE (reservation_pk, guest_id);
ALTER TABLE breezeway.task_assignments ADD CONSTRAINT task_assignments_unique UNIQUE (task_pk, assignee_id);
ALTER TABLE breezeway.task_photos ADD CONSTRAINT task_photos_unique UNIQUE (task_pk, photo_id);
ALTER TABLE breezeway.task_comments ADD CONSTRAINT task_comments_unique UNIQUE (task_pk, comment_id);

COMMIT;

-- Step 4: reclaim the space.
VACUUM FULL breezeway.task_requirements;
VACUUM FULL breezeway.property_photos;
VACUUM FULL breezeway.reservation_guests;
VACUUM FULL breezeway.task_assignments;
VACUUM FULL breezeway.task_photos;
VACUUM FULL breezeway.task_comments;
