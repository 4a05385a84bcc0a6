-- Federation: events that passed auth against their own state but failed
-- against the room's current state are kept (other events may reference
-- them) but never become forward extremities or reach clients.
ALTER TABLE events ADD COLUMN soft_failed INTEGER NOT NULL DEFAULT 0;

-- The state group before the event (for state events it differs from
-- state_group, the state after it): needed where the prev events are not
-- stored here (rooms joined over federation) or were several (a merge).
ALTER TABLE events ADD COLUMN prev_state_group BIGINT;
