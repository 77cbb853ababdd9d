-- 014: routing probes the pattern index per event, whatever the statistics say.
-- Append-only: never edit a migration that has shipped; add the next number instead.
--
-- Routing (repository.py, _ROUTE_SQL) matched each event against the pattern table inside
-- one statement, and the planner chose how. Statistics taken while every subscription shared
-- one pattern make any pattern look like it matches every row; the planner then scanned the
-- whole pattern table per event, evaluating the type's expansion on every row: a 500-event
-- batch beside 10 000 subscriptions took 30 s and hit the statement timeout (the bench's idle
-- scenario, after scenarios that left such statistics behind). The lookup is now a function
-- of its own: the expansion is computed once per event, and the scan is always the primary
-- key's (pattern, subscription_id) index. A SET clause keeps the function from being inlined,
-- so its statement is planned on its own, with sequential scans off.
CREATE FUNCTION dispatcher_route_matches(p_type text) RETURNS SETOF uuid
LANGUAGE sql STABLE STRICT PARALLEL SAFE
ROWS 4
SET enable_seqscan = off
AS $$
    -- '*' matches every type but the dispatcher's own operational events ('dispatcher.…',
    -- 011): those go only to subscriptions that name them.
    SELECT p.subscription_id
    FROM webhook_subscription_patterns p
    WHERE p.pattern = ANY (dispatcher_type_patterns(p_type))
      AND (p.pattern <> '*' OR NOT starts_with(p_type, 'dispatcher.'))
$$;
