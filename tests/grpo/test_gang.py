"""The reservation ledger's rules (grpo.gang), on the class itself; the Ray side is in test_engine_ray."""

from grpo.gang import ReservationLedger


def test_a_run_alone_books_even_when_it_must_wait_for_its_placement_groups():
    ledger = ReservationLedger()
    granted, reason = ledger.book("a", {"CPU": 6}, 60, free={"CPU": 2})
    assert granted and "no other run is starting" in reason


def test_a_second_run_waits_while_the_first_has_not_placed_what_it_booked():
    ledger = ReservationLedger()
    assert ledger.book("a", {"CPU": 6}, 60, free={"CPU": 8})[0]
    granted, reason = ledger.book("b", {"CPU": 6}, 60, free={"CPU": 8})
    assert not granted
    assert "needs 6 CPU" in reason and "free 8 CPU" in reason and "6 CPU is booked by 1 run" in reason
    # two that fit together both book
    assert ledger.book("c", {"CPU": 2}, 60, free={"CPU": 8})[0]
    assert set(ledger.bookings()) == {"a", "c"}


def test_a_run_that_waits_on_its_placement_groups_keeps_others_off_what_it_waits_for():
    ledger = ReservationLedger()
    assert ledger.book("b", {"CPU": 6}, 60, free={"CPU": 3})[0]  # alone: books, waits for a running run
    assert not ledger.book("c", {"CPU": 2}, 60, free={"CPU": 3})[0]  # 3 free, 6 booked: c must not take them


def test_release_and_lapsed_leases_free_the_booking():
    ledger = ReservationLedger()
    assert ledger.book("a", {"CPU": 6}, 60, free={"CPU": 8})[0]
    assert ledger.book("a", {"CPU": 6}, 60, free={"CPU": 0})[0]  # renewing its own booking always works
    assert ledger.release("a") and not ledger.release("a")
    assert ledger.book("b", {"CPU": 6}, 0.0, free={"CPU": 8})[0]  # a lease of 0 s lapses at once
    assert ledger.book("c", {"CPU": 6}, 60, free={"CPU": 8})[0]
    assert set(ledger.bookings()) == {"c"}


def test_every_resource_must_fit():
    ledger = ReservationLedger()
    assert ledger.book("a", {"CPU": 1, "GPU": 1}, 60, free={"CPU": 8, "GPU": 2})[0]
    assert not ledger.book("b", {"CPU": 1, "GPU": 2}, 60, free={"CPU": 8, "GPU": 2})[0]
    assert ledger.book("c", {"CPU": 1, "GPU": 1}, 60, free={"CPU": 8, "GPU": 2})[0]
