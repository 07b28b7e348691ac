"""HTTP routes, one module per area: completions, chat, admin, metrics, and the small ones (misc)."""
