"""The ingress process (`dispatcher serve`): routes, auth, problems, and the engine behind them."""
