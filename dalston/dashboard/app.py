"""`dalston dashboard`: engines, models and jobs, live from NATS, driven by the keyboard."""

from __future__ import annotations

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Static, TabbedContent, TabPane

from dalston.config import Settings
from dalston.contracts import JobRecord
from dalston.dashboard.data import DashboardData, EngineView
from dalston.dashboard.widgets import JobScreen, JobsTable, LiveTable, ModelsTable
from dalston.formatting import ago, install_status, size
from dalston.model_state import ModelState

ENGINE_COLUMNS = ("runtime", "instance", "status", "loaded", "device", "memory", "tasks", "seen")
MODEL_COLUMNS = ("model", "runtime", "languages", "size", "installed", "loaded on")
JOB_COLUMNS = ("job", "status", "model", "file", "stages", "created")
TASK_MARKS = {"completed": "✓", "running": "▶", "failed": "✗", "cancelled": "-"}
# Repaints coalesce the NATS updates that arrived in between (a job watch delivers many at once).
REFRESH_SECONDS = 0.2


class DashboardApp(App):
    TITLE = "Dalston"
    CSS = """
    #summary { height: 1; padding: 0 1; background: $boost; }
    TabPane { padding: 0; }
    #job-facts { padding: 0 1; background: $boost; }
    #job-text { padding: 1; }
    """
    BINDINGS = [
        Binding("1,e", "show('engines')", "Engines"),
        Binding("2,m", "show('models')", "Models"),
        Binding("3,j", "show('jobs')", "Jobs"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, settings: Settings, forget_after: float = 60.0) -> None:
        super().__init__()
        self.data = DashboardData(settings, on_change=self._changed, forget_after=forget_after)
        self._dirty = True
        self._problem = ""

    def compose(self) -> ComposeResult:
        yield Static(id="summary")
        with TabbedContent(initial="engines"):
            with TabPane("1 Engines", id="engines"):
                yield LiveTable(ENGINE_COLUMNS, id="engines-table")
            with TabPane("2 Models", id="models"):
                yield ModelsTable(MODEL_COLUMNS, id="models-table")
            with TabPane("3 Jobs", id="jobs"):
                yield JobsTable(JOB_COLUMNS, id="jobs-table")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#engines-table").focus()
        # In a worker: connecting retries while NATS is not up, and the screen must not freeze.
        self.run_worker(self._connect(), exclusive=True)
        self.set_interval(REFRESH_SECONDS, self._repaint)
        # Ages and silent engines change with time alone.
        self.set_interval(1.0, self._changed)

    async def _connect(self) -> None:
        try:
            await self.data.start()
        except Exception as exc:  # noqa: BLE001 - shown, not raised: the user can read it and quit
            self._problem = f"cannot read NATS: {exc}"
        self._changed()

    async def on_unmount(self) -> None:
        await self.data.stop()

    def _changed(self) -> None:
        self._dirty = True

    # --- actions --------------------------------------------------------------------------------

    def action_show(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        self.query_one(f"#{tab}-table").focus()

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self.query_one(f"#{event.pane.id}-table").focus()

    async def action_pull(self) -> None:
        model = self.query_one("#models-table", ModelsTable).selected_key
        if model is None or self.data.bus is None:
            return
        await self.data.request_pull(model)
        self.notify(f"pulling {model}")

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        record = self.data.jobs.get(event.row_key.value)
        if event.data_table.id == "jobs-table" and record is not None:
            self.push_screen(JobScreen(record, self.data))

    # --- painting --------------------------------------------------------------------------------

    def _repaint(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        self.data.expire()
        engines = self.data.engines
        models = self.data.models()
        jobs = self.data.recent_jobs()
        self.query_one("#engines-table", LiveTable).show(
            {subject: _engine_row(view) for subject, view in sorted(
                engines.items(), key=lambda item: (item[1].beat.runtime, item[1].beat.engine))})
        self.query_one("#models-table", LiveTable).show({m.spec.id: _model_row(m) for m in models})
        self.query_one("#jobs-table", LiveTable).show({r.id: _job_row(r) for r in jobs})
        running = sum(r.status in ("queued", "running") for r in jobs)
        servers = ", ".join(self.data.settings.nats_servers)
        self.query_one("#summary", Static).update(
            self._problem or (f"connecting to {servers} …" if self.data.bus is None else
                              f"{servers}   engines {len(self.data.live_engines())}   models "
                              f"{sum(m.installed for m in models)}/{len(models)} installed   jobs {running} active"))


def _engine_row(view: EngineView) -> tuple[str, ...]:
    beat = view.beat
    memory = size(beat.rss_bytes) + (f" +{size(beat.vram_bytes)} GPU" if beat.vram_bytes else "")
    return (beat.runtime, beat.engine, view.status,
            ",".join(m.runtime_model_id for m in beat.loaded_models) or "-", beat.device, memory,
            str(beat.tasks_done) + (f" ✗{beat.tasks_failed}" if beat.tasks_failed else ""),
            ago(beat.sent_at))


def _model_row(state: ModelState) -> tuple[str, ...]:
    spec = state.spec
    return (spec.id, spec.runtime, ",".join(spec.languages) or "any", size(spec.size_bytes),
            install_status(state.installed, state.pull), ",".join(state.loaded_on) or "-")


def _job_row(record: JobRecord) -> tuple[str, ...]:
    marks = "".join(TASK_MARKS.get(t.status, "·") for t in record.tasks.values())
    current = next((t.stage for t in record.tasks.values() if t.status == "running"), "")
    return (record.id[:8], record.status, record.model, record.filename, f"{marks} {current}".rstrip(),
            ago(record.created_at))
