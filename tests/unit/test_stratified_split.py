"""The consolidation's hold-out: the newest share of each kind of retrieval, so that no check is left without
a relevant retrieval while the group has two."""

from icldaemon.consolidate import stratified_split


def test_each_kind_gives_its_newest_share_and_at_least_one_of_two_or_more():
    relevant = [("r", age) for age in range(8)]  # oldest first
    irrelevant = [("i", age) for age in range(3)]

    fit, held_out = stratified_split([relevant, irrelevant], 0.25, order=lambda item: item[1])

    # 8 x 0.25 = 2 newest relevant; 3 x 0.25 rounds to 1 newest irrelevant
    assert sorted(held_out) == [("i", 2), ("r", 6), ("r", 7)]
    assert sorted(fit) == sorted([*relevant[:6], *irrelevant[:2]])
    assert [item[1] for item in fit] == sorted(item[1] for item in fit)


def test_a_kind_of_one_is_fitted_and_a_kind_of_two_gives_one_to_check():
    fit, held_out = stratified_split([[("r", 0)], [("i", 1), ("i", 2)]], 0.9, order=lambda item: item[1])

    assert fit == [("r", 0), ("i", 1)] and held_out == [("i", 2)]


def test_the_newest_quarter_of_all_retrievals_could_be_irrelevant_only_but_the_split_never_is():
    # a memory retrieved for its own questions first, then only for other memories' questions
    relevant = [("r", age) for age in range(4)]
    irrelevant = [("i", age) for age in range(4, 12)]

    _fit, held_out = stratified_split([relevant, irrelevant], 0.25, order=lambda item: item[1])

    assert {kind for kind, _age in held_out} == {"r", "i"}
