"""What a run writes: plots, the Markdown and HTML reports, the output folder (plotting only reads results)."""
