"""Working with finished experiments' files (``oof/<exp>/``, ``models/<exp>/``): scores, the leaderboard, blends,
re-ranking chosen on OOF, the test split, holdouts and plots."""
