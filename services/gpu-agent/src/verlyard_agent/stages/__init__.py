"""Stage kinds: one module per kind, each `async def run(ctx: AttemptContext) -> StageResult`."""
