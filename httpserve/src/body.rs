//! The body-read deadline: a request body that pauses longer than the limit ends with a
//! [`BodyTimeout`] error, which the handler's body reader sees like any broken body and
//! [`body_timeout`] tells apart (for a 408).

use std::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// The error a timed body ends with when the client paused too long.
#[derive(Debug, thiserror::Error)]
#[error("the request body paused for more than {0:?}")]
pub struct BodyTimeout(pub Duration);

/// The wait that ran out, when `err` or an error it wraps is a [`BodyTimeout`].
pub fn body_timeout(err: &(dyn Error + 'static)) -> Option<Duration> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(BodyTimeout(waited)) = e.downcast_ref::<BodyTimeout>() {
            return Some(*waited);
        }
        next = e.source();
    }
    None
}

/// `inner`, failing with [`BodyTimeout`] when no frame comes for `timeout` while it is read.
pub(crate) struct TimedBody<B> {
    inner: B,
    timeout: Duration,
    /// Armed while the reader waits; reset by each frame.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            deadline: None,
        }
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body + Unpin,
    B::Error: Into<Box<dyn Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.deadline = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let deadline = this.deadline.get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep_until(Instant::now() + timeout))
                });
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(timeout))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use axum::body::Bytes;

    use super::*;

    /// A body that yields its chunks with the given pauses before each.
    struct Paced {
        chunks: Vec<(Duration, &'static str)>,
        sleep: Option<Pin<Box<Sleep>>>,
    }

    impl Body for Paced {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            let Some(&(pause, chunk)) = self.chunks.first() else {
                return Poll::Ready(None);
            };
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(pause)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
            self.chunks.remove(0);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(chunk.as_bytes())))))
        }
    }

    async fn read(
        chunks: Vec<(Duration, &'static str)>,
        timeout: Duration,
    ) -> Result<String, Box<dyn Error + Send + Sync>> {
        let body = axum::body::Body::new(TimedBody::new(
            Paced {
                chunks,
                sleep: None,
            },
            timeout,
        ));
        let bytes = axum::body::to_bytes(body, usize::MAX).await?;
        Ok(String::from_utf8(bytes.to_vec())?)
    }

    #[tokio::test(start_paused = true)]
    async fn each_pause_is_timed_not_the_whole_body() {
        let ms = Duration::from_millis;
        // Three pauses of 80 ms under a 100 ms limit: 240 ms in all, never one pause too long.
        let ok = read(vec![(ms(80), "a"), (ms(80), "b"), (ms(80), "c")], ms(100)).await;
        assert_eq!(ok.unwrap(), "abc");
        let err = read(vec![(ms(10), "a"), (ms(150), "b")], ms(100))
            .await
            .unwrap_err();
        assert_eq!(body_timeout(&*err), Some(ms(100)), "{err}");
        assert!(err.to_string().contains("paused"), "{err}");
        let other: Box<dyn Error> = "not a timeout".into();
        assert_eq!(body_timeout(&*other), None);
    }
}
