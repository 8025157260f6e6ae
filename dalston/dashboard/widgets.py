"""The dashboard's widgets: tables that update in place, and the screen of one job."""

from __future__ import annotations

from collections.abc import Sequence

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from dalston.contracts import JobRecord
from dalston.dashboard.data import DashboardData
from dalston.formatting import ago, stages


class LiveTable(DataTable):
    """A row-cursor table whose rows are replaced wholesale by `show`, keeping the cursor on
    the same row (by key) and repainting only cells that changed."""

    def __init__(self, columns: Sequence[str], **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self._column_names = list(columns)

    def on_mount(self) -> None:
        for name in self._column_names:
            self.add_column(name, key=name)

    @property
    def selected_key(self) -> str | None:
        if not self.row_count:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value

    def show(self, rows: dict[str, Sequence[object]]) -> None:
        current = [row.key.value for row in self.ordered_rows]
        if current != list(rows):
            selected = self.selected_key
            self.clear()
            for key, cells in rows.items():
                self.add_row(*cells, key=key)
            if selected in rows:
                self.move_cursor(row=self.get_row_index(selected))
            return
        for key, cells in rows.items():
            for name, old, new in zip(self._column_names, self.get_row(key), cells):
                if old != new:
                    self.update_cell(key, name, new, update_width=True)


class ModelsTable(LiveTable):
    BINDINGS = [Binding("p", "app.pull", "Pull model")]


class JobsTable(LiveTable):
    BINDINGS = [Binding("enter", "select_cursor", "Open job")]


class JobScreen(Screen):
    """One job: its facts, its tasks, and its transcript (read from the object store)."""

    BINDINGS = [Binding("escape,backspace", "app.pop_screen", "Back")]

    def __init__(self, record: JobRecord, data: DashboardData) -> None:
        super().__init__()
        self.record = record
        self.data = data

    def compose(self) -> ComposeResult:
        r = self.record
        yield Static(f"{r.id}  {r.status}  {r.model}  {r.filename}  {ago(r.created_at)}\n{stages(r)}",
                     id="job-facts", markup=False)
        with VerticalScroll():
            yield Static("…", id="job-text", markup=False)
        yield Footer()

    async def on_mount(self) -> None:
        r = self.record
        if r.status == "completed" and r.transcript_object:
            try:
                text = (await self.data.transcript(r)).text or "(no speech)"
            except Exception as exc:  # noqa: BLE001 - expired or unreadable: say so on screen
                text = f"the transcript cannot be read: {exc}"
        elif r.failure is not None:
            text = f"{r.status}: {r.failure.message}"
        else:
            text = f"the job is {r.status}; the transcript is not ready yet"
        self.query_one("#job-text", Static).update(text)
