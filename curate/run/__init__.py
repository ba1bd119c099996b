"""Orchestration over every stage: `curate run` (recipe to leaderboard), `curate demo`, and the scorer trainer."""
