"""The reverse process: samplers and the text-to-image pipeline (the sampling issue)."""
