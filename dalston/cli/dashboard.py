"""`dalston dashboard`: the live terminal view of engines, models and jobs."""

from __future__ import annotations

from dalston.config import Settings


def register(commands) -> None:
    dashboard = commands.add_parser("dashboard", help="live terminal dashboard (engines, models, jobs)")
    dashboard.set_defaults(func=_run)


def _run(args, settings: Settings) -> int:
    # Textual is imported only here: the other commands start faster without it.
    from dalston.dashboard.app import DashboardApp

    DashboardApp(settings).run()
    return 0
