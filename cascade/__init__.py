"""uncertainty-cascade: small model first, escalate on calibrated uncertainty."""
