"""`neolm serve`: an OpenAI-compatible HTTP server (completions, chat completions, streaming) over one model.

engine.py schedules and batches the generations, protocol.py reads OpenAI's requests and writes its responses,
http.py answers the routes; cli.py is the subcommand."""
