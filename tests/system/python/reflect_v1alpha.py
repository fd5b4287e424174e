"""A stock Python gRPC client that knows Hodei only through server reflection v1alpha.

Usage: reflect_v1alpha.py ADDRESS TOKEN SPEC_JSON

Lists the services, loads hodei.v1.JobService's descriptors through
grpc_reflection.v1alpha, submits SPEC_JSON as a SubmitJobRequest built from those
descriptors, then watches the job's events to the end of the stream. Prints one JSON
object per line: {"services": [...]}, {"submitted": JOB_ID}, {"event": ...} per event,
and {"watched": N} when the stream ended.
"""

import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main() -> int:
    address, token, spec = sys.argv[1], sys.argv[2], sys.argv[3]
    channel = grpc.insecure_channel(address)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    services = [s.name for s in next(answers).list_services_response.service]
    print(json.dumps({"services": services}), flush=True)

    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    jobs = pool.FindServiceByName("hodei.v1.JobService")
    metadata = [("authorization", f"Bearer {token}")]

    def call(method_name, streaming):
        method = jobs.FindMethodByName(method_name)
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        path = f"/{jobs.full_name}/{method.name}"
        make = channel.unary_stream if streaming else channel.unary_unary
        rpc = make(
            path,
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        return request_class, rpc

    request_class, submit = call("SubmitJob", streaming=False)
    request = json_format.Parse(json.dumps({"spec": json.loads(spec)}), request_class())
    job_id = submit(request, metadata=metadata, timeout=30).job.id
    print(json.dumps({"submitted": job_id}), flush=True)

    request_class, watch = call("WatchJob", streaming=True)
    count = 0
    for event in watch(request_class(job_id=job_id), metadata=metadata, timeout=60):
        count += 1
        print(json.dumps({"event": json_format.MessageToDict(event)}), flush=True)
    print(json.dumps({"watched": count}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
