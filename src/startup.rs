//! Application::build(listener) -> run.
