//! Errors of the SQS adapter and how SQS error codes map onto ackstack's settle errors.
//!
//! | SQS answer | meaning for us |
//! |---|---|
//! | `ReceiptHandleIsInvalid`, `MessageNotInflight` | lease lost |
//! | `InvalidParameterValue` about the `ReceiptHandle` (real SQS answers this for an expired or superseded handle: "Message does not exist or is not available for visibility timeout change", "The receipt handle has expired") | lease lost |
//! | throttling, `InternalError`, `ServiceUnavailable`, a 5xx status, batch entries with `SenderFault=false`, timeouts (the SDK's and [`SqsConfig::operation_timeout`](crate::SqsConfig::operation_timeout)), connection errors | transient |
//! | anything else | rejected |

use std::future::Future;
use std::time::Duration;

use ackstack_core::{BoxError, SettleError};
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// The SQS adapter could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqsError {
    /// The configuration is invalid.
    #[error("invalid SQS configuration: {0}")]
    Config(String),
    /// A queue does not exist and `create_queues` is off.
    #[error("SQS queue {0:?} does not exist (set create_queues to create it)")]
    QueueNotFound(String),
    /// SQS refused a request for good (access denied, an invalid parameter): repeating it
    /// cannot help.
    #[error("SQS refused the request: {0}")]
    Refused(String),
    /// An SQS request failed.
    #[error("SQS request failed: {0}")]
    Sdk(#[source] BoxError),
    /// An SQS request got no answer within [`SqsConfig::operation_timeout`](crate::SqsConfig).
    #[error("SQS {operation} got no answer within {after:?}")]
    Timeout {
        /// The SQS operation (`GetQueueUrl`, `SendMessage`, …).
        operation: &'static str,
        /// The timeout that passed.
        after: Duration,
    },
}

impl SqsError {
    /// Whether repeating the call cannot help: the configuration, a queue that does not exist
    /// (and is not to be created), or a refusal such as access denied. A consumer that waits
    /// for its broker at start-up stops waiting on these and reports them.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            SqsError::Config(_) | SqsError::QueueNotFound(_) | SqsError::Refused(_)
        )
    }
}

/// How an SQS error is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// The receipt handle is no longer ours.
    LeaseLost,
    /// May pass when repeated.
    Transient,
    /// Repeating it will not help.
    Rejected,
}

const LEASE_LOST_CODES: &[&str] = &[
    "ReceiptHandleIsInvalid",
    "AWS.SimpleQueueService.ReceiptHandleIsInvalid",
    "MessageNotInflight",
    "AWS.SimpleQueueService.MessageNotInflight",
];

const TRANSIENT_CODES: &[&str] = &[
    "RequestThrottled",
    "AWS.SimpleQueueService.RequestThrottled",
    "ThrottlingException",
    "Throttling",
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "RequestTimeout",
    "KmsThrottled",
    "KMS.ThrottlingException",
];

/// Classifies an error code and message as SQS returns them (whole-request or per batch entry).
/// `sender_fault` is the batch entry's flag, when there is one.
pub(crate) fn classify_code(code: &str, message: &str, sender_fault: Option<bool>) -> ErrorClass {
    if LEASE_LOST_CODES.contains(&code) {
        return ErrorClass::LeaseLost;
    }
    if code == "InvalidParameterValue" || code == "AWS.SimpleQueueService.InvalidParameterValue" {
        let lower = message.to_ascii_lowercase();
        if lower.contains("receipthandle")
            || lower.contains("receipt handle")
            || lower.contains("does not exist or is not available")
        {
            return ErrorClass::LeaseLost;
        }
        return ErrorClass::Rejected;
    }
    if TRANSIENT_CODES.contains(&code) || sender_fault == Some(false) {
        return ErrorClass::Transient;
    }
    ErrorClass::Rejected
}

/// A failed SQS call: the SDK's error, or no answer within the operation timeout.
#[derive(Debug)]
pub(crate) enum CallError<E> {
    /// The SDK returned an error (boxed: it is large, and a failure is the rare path).
    Sdk(Box<SdkError<E>>),
    /// No answer within the timeout.
    Timeout {
        operation: &'static str,
        after: Duration,
    },
}

impl<E> CallError<E>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    /// How the error is handled: a timeout is transient.
    pub(crate) fn class(&self) -> ErrorClass {
        match self {
            CallError::Sdk(e) => classify_sdk(e),
            CallError::Timeout { .. } => ErrorClass::Transient,
        }
    }

    /// The full text, with the SDK error's causes.
    pub(crate) fn describe(&self) -> String {
        match self {
            CallError::Sdk(e) => describe(e),
            CallError::Timeout { operation, after } => {
                format!("{operation} got no answer within {after:?}")
            }
        }
    }

    /// Whether SQS refused the message itself (its contents or size), as opposed to the
    /// request or the queue: sending the same message again cannot succeed.
    pub(crate) fn refuses_message(&self) -> bool {
        let CallError::Sdk(e) = self else {
            return false;
        };
        let SdkError::ServiceError(service) = e.as_ref() else {
            return false;
        };
        if service.raw().status().as_u16() >= 500 {
            return false;
        }
        matches!(
            service.err().code(),
            Some(
                "InvalidMessageContents"
                    | "InvalidParameterValue"
                    | "AWS.SimpleQueueService.InvalidParameterValue"
            )
        )
    }

    /// As a setup error: [`SqsError::Refused`] for what no retry can fix.
    pub(crate) fn into_sqs_error(self) -> SqsError {
        match self {
            CallError::Sdk(e) if classify_sdk(&e) == ErrorClass::Rejected => {
                SqsError::Refused(describe(&e))
            }
            CallError::Sdk(e) => SqsError::Sdk(describe(&e).into()),
            CallError::Timeout { operation, after } => SqsError::Timeout { operation, after },
        }
    }
}

/// Runs one SQS call (`send()` of a request builder), failing it with
/// [`CallError::Timeout`] when it has no answer within `after`.
pub(crate) async fn bounded<T, E>(
    operation: &'static str,
    after: Duration,
    call: impl Future<Output = Result<T, SdkError<E>>>,
) -> Result<T, CallError<E>> {
    match tokio::time::timeout(after, call).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => Err(CallError::Sdk(Box::new(e))),
        Err(_) => Err(CallError::Timeout { operation, after }),
    }
}

/// Classifies a failed SDK call.
pub(crate) fn classify_sdk<E>(err: &SdkError<E>) -> ErrorClass
where
    E: ProvideErrorMetadata,
{
    match err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let class = classify_code(e.code().unwrap_or(""), e.message().unwrap_or(""), None);
            let server_side = service.raw().status().as_u16() >= 500;
            if class == ErrorClass::Rejected && server_side {
                ErrorClass::Transient
            } else {
                class
            }
        }
        SdkError::ConstructionFailure(_) => ErrorClass::Rejected,
        _ => ErrorClass::Transient,
    }
}

/// The full text of an SDK error, with its causes.
pub(crate) fn describe<E>(err: &SdkError<E>) -> String
where
    E: std::error::Error + 'static,
{
    DisplayErrorContext(err).to_string()
}

/// A settle error of `class` with this message.
pub(crate) fn settle_error(class: ErrorClass, message: String) -> SettleError {
    match class {
        ErrorClass::LeaseLost => SettleError::LeaseLost(message),
        ErrorClass::Transient => SettleError::Broker(message.into()),
        ErrorClass::Rejected => SettleError::Rejected(message),
    }
}

/// Whether the error says that the queue does not exist.
pub(crate) fn is_missing_queue<E>(err: &SdkError<E>) -> bool
where
    E: ProvideErrorMetadata,
{
    match err {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("");
            code == "QueueDoesNotExist"
                || code == "AWS.SimpleQueueService.NonExistentQueue"
                || code.ends_with("NonExistentQueue")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipt_handle_errors_are_lease_lost() {
        assert_eq!(
            classify_code("ReceiptHandleIsInvalid", "", None),
            ErrorClass::LeaseLost
        );
        assert_eq!(
            classify_code("MessageNotInflight", "", None),
            ErrorClass::LeaseLost
        );
        // What real SQS answers for ChangeMessageVisibility with a superseded handle.
        assert_eq!(
            classify_code(
                "InvalidParameterValue",
                "Value AQEB... for parameter ReceiptHandle is invalid. Reason: Message does not \
                 exist or is not available for visibility timeout change.",
                None
            ),
            ErrorClass::LeaseLost
        );
        assert_eq!(
            classify_code(
                "InvalidParameterValue",
                "Value x for parameter ReceiptHandle is invalid. Reason: The receipt handle has expired.",
                Some(true)
            ),
            ErrorClass::LeaseLost
        );
    }

    #[test]
    fn other_errors() {
        assert_eq!(
            classify_code(
                "InvalidParameterValue",
                "Value 50000 for parameter VisibilityTimeout is invalid. Reason: Total \
                 VisibilityTimeout for the message is beyond the limit [43200 seconds]",
                None
            ),
            ErrorClass::Rejected
        );
        assert_eq!(
            classify_code("InternalError", "", Some(false)),
            ErrorClass::Transient
        );
        assert_eq!(
            classify_code("Whatever", "", Some(false)),
            ErrorClass::Transient
        );
        assert_eq!(
            classify_code("RequestThrottled", "", None),
            ErrorClass::Transient
        );
        assert_eq!(
            classify_code("AccessDenied", "", Some(true)),
            ErrorClass::Rejected
        );
    }
}
