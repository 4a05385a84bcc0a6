-- Federation: events that passed auth against their own state but failed
-- against the room's current state are kept (other events may reference
-- them) but never become forward extremities or reach clients.
ALTER TABLE events ADD COLUMN soft_failed INTEGER NOT NULL DEFAULT 0;
