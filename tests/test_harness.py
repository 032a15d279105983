"""The harness itself: a real cluster answers, password auth over TCP is enforced."""

import psycopg2
import pytest


def test_cluster_is_real_and_password_protected(pg, fresh_db):
    assert pg.scalar("select current_database()", fresh_db) == fresh_db
    assert pg.version >= 13
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(**pg.dsn(fresh_db, password="wrong"))
