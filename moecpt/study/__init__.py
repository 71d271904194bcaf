"""moecpt.study: the router-robustness CPT study (plan, runner, typed results, findings, report, plots)."""
