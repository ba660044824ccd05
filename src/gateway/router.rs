//! Request path -> route. The I/O layer asks once per connection, before it answers the handshake, so
//! that an unknown path gets a 404 instead of a WebSocket that goes nowhere.

/// What a WebSocket connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Send every message back.
    Echo,
}

/// Maps request paths to routes.
#[derive(Clone, Debug)]
pub struct Router {
    echo_path: String,
}

impl Default for Router {
    fn default() -> Self {
        Router { echo_path: "/echo".to_string() }
    }
}

impl Router {
    /// The route for a request target (path plus optional query), or `None` for a 404.
    pub fn route(&self, target: &str) -> Option<Route> {
        let path = target.split_once('?').map_or(target, |(path, _)| path);
        (path == self.echo_path).then_some(Route::Echo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_path_matches_with_or_without_query() {
        let router = Router::default();
        assert_eq!(router.route("/echo"), Some(Route::Echo));
        assert_eq!(router.route("/echo?x=1"), Some(Route::Echo));
        assert_eq!(router.route("/echo/more"), None);
        assert_eq!(router.route("/"), None);
    }
}
