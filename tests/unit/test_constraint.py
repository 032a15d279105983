"""module_utils/dedup_constraint.py: the one decision of "the UNIQUE constraint is there already", shared by the
constraint step (pg_unique_constraint) and the online path (pure: candidate dicts as find_equivalent_unique
returns them, no cluster)."""

from __future__ import annotations

from _load import module_util

constraint = module_util("dedup_constraint")


def cand(name, ctype="constraint", usable=True, nnd=False, index_name=None):
    return {"name": name, "type": ctype, "usable": usable, "nulls_not_distinct": nnd,
            "index_name": index_name or name}


def test_the_first_usable_candidate_counts():
    found = [cand("broken", usable=False), cand("t_a_b_key"), cand("other")]
    assert constraint.pick_equivalent(found, [], False)["name"] == "t_a_b_key"


def test_nothing_usable_means_none():
    assert constraint.pick_equivalent([cand("x", usable=False)], [], False) is None
    assert constraint.pick_equivalent([], ["a"], True) is None


def test_nulls_distinct_does_not_count_when_nulls_not_distinct_is_wanted_on_nullable_columns():
    warned = []
    found = [cand("plain"), cand("strict", nnd=True)]
    assert constraint.pick_equivalent(found, ["b"], True, warn=warned.append)["name"] == "strict"
    assert len(warned) == 1 and "plain" in warned[0] and "key columns b are nullable" in warned[0]
    # not nullable: NULLS NOT DISTINCT makes no difference, the plain one counts
    assert constraint.pick_equivalent(found, [], True)["name"] == "plain"
    # a stricter NULLS NOT DISTINCT one satisfies a plain request
    assert constraint.pick_equivalent([cand("strict", nnd=True)], ["b"], False)["name"] == "strict"


def test_our_own_unattached_index_is_not_the_constraint_when_named():
    found = [cand("t_a_key", ctype="index")]
    assert constraint.pick_equivalent(found, [], False, own_index="t_a_key") is None
    assert constraint.pick_equivalent(found, [], False)["name"] == "t_a_key"
    # someone else's index of the same columns does count
    other = [cand("their_idx", ctype="index"), cand("t_a_key", ctype="index")]
    assert constraint.pick_equivalent(other, [], False, own_index="t_a_key")["name"] == "their_idx"
