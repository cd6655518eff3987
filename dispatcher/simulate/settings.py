"""Every simulator knob with its default: driver behaviour, the Vendure stand-in, the run."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class DriverBehaviour:
    """How simulated drivers move and answer. docs/SIMULATOR.md explains each default."""

    # Drivers go in straight lines; roads make a trip longer than the line by this factor.
    # None: the city's own (Manhattan 4/π, the source's grid distance; synthetic 1.3).
    detour_factor: float | None = None
    # Multiplies the city's speed (Manhattan: the source's speed for that time of day).
    speed_factor: float = 1.0
    # A phone sends a fix this often while on shift; it must stay under the service's
    # heartbeat TTL (60 s) or drivers drop out of dispatch between fixes.
    ping_period_s: float = 10.0
    # Each driver works one shift a day, starting at an hour drawn from the demand profile.
    shift_hours: float = 8.0
    # Waiting at the shop for the order, then handing it over at the door.
    pickup_wait_s: float = 180.0
    dropoff_s: float = 60.0
    # Share of deliveries the driver reports failed at the door.
    fail_share: float = 0.01
    # Offers (the offer handler; not used in auto mode, where nobody is asked):
    # acceptance falls with pickup distance, p = accept_at_zero_km * 0.5 ** (km / accept_half_km).
    accept_at_zero_km: float = 0.95
    accept_half_km: float = 3.0
    # Answers take an exponential time with this mean; some drivers never answer at all.
    response_mean_s: float = 8.0
    never_answer_share: float = 0.05


@dataclass(frozen=True, slots=True)
class VendureBehaviour:
    """The shop side: what happens to an order nobody took, and customers who cancel."""

    # `assigned: false` stores nothing, so the shop sends the order again after this long...
    retry_s: float = 30.0
    # ...until this long after it was ready; then the order counts as unassigned.
    give_up_s: float = 600.0
    # Share of orders cancelled by the customer, at a uniform time in (0, cancel_within_s]
    # after ready; only orders not yet picked up can be cancelled.
    cancel_share: float = 0.02
    cancel_within_s: float = 600.0


@dataclass(frozen=True, slots=True)
class DispatchRule:
    """The service settings the offline matcher applies (the service's defaults)."""

    search_radius_km: float = 5.0
    heartbeat_ttl_s: float = 60.0


@dataclass(frozen=True, slots=True)
class RunSettings:
    """One run: seed, span and scale."""

    seed: int = 1
    # Simulated time starts at this hour of the first day (day 0 = Monday).
    start_hour: float = 0.0
    hours: float = 24.0
    drivers: int = 150
    # Manhattan: share of the source's taxi trips that become orders; synthetic: multiplies its rate.
    demand_scale: float = 1.0
    driver: DriverBehaviour = field(default_factory=DriverBehaviour)
    vendure: VendureBehaviour = field(default_factory=VendureBehaviour)
    rule: DispatchRule = field(default_factory=DispatchRule)
