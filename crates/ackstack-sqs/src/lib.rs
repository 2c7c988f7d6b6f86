//! Amazon SQS (aws-sdk-sqs) adapter for ackstack.
