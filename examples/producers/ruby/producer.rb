# A duogen producer in Ruby (Debian: ruby, ruby-redis, ruby-google-protobuf).
#
#   ruby producer.rb --redis URL [--tls-ca-file FILE] --id ID --image FILE --out DIR [--prefix P] [--meta KEY=VALUE]... TEXT...
#
# Enqueues one job (the image, then the text, as the user's message), follows its events,
# waits for its result and writes DIR/answer.md with DIR/image-N.png. duogen_pb.rb is
# generated from proto/duogen.proto (`protoc --ruby_out=DIR proto/duogen.proto`; `make` puts
# it in build/gen/ruby: run with RUBYLIB=build/gen/ruby). examples/producers/README.md says
# what every producer of this folder prints and exits with.
require "fileutils"
require "openssl"
require "optparse"
require "redis"
require "duogen_pb"

EXIT_JOB = 1
EXIT_USAGE = 2
EXIT_IO = 3
TIMEOUT_S = 120

def fail_with(code, message)
  warn "producer: #{message}"
  exit code
end

def build_job(id, image, text, meta)
  job = Duogen::V1::Job.new(id: id)
  job.messages << Duogen::V1::Message.new(
    role: :USER,
    parts: [Duogen::V1::Part.new(image: Duogen::V1::Image.new(data: image)),
            Duogen::V1::Part.new(text: text)])
  meta.each do |kv|
    k, v = kv.split("=", 2)
    job.metadata[k] = v
  end
  job
end

# The line printed for one event (nil for text deltas) and whether it is the job's last.
def event_line(ev)
  case ev.payload
  when :started then ["started worker=#{ev.started.worker_id} attempt=#{ev.started.attempt}", false]
  when :image_started
    s = ev.image_started
    ["image #{s.index} started #{s.width}x#{s.height} steps=#{s.steps}", false]
  when :step then ["image #{ev.step.index} step #{ev.step.step}/#{ev.step.steps}", false]
  when :image_done
    where = ev.image_done.key.empty? ? ev.image_done.path : ev.image_done.key   # a key, or a file (output_root)
    ["image #{ev.image_done.index} done #{where}", false]
  when :done then [ev.done.status.to_s.downcase, true]
  when :failed then ["failed #{ev.failed.error.code}: #{ev.failed.error.message}", true]
  when :cancelled then ["cancelled", true]
  else [nil, false]
  end
end

# Prints the job's events from its first until its final one.
def follow(r, events_key)
  last = "0"
  deadline = Time.now + TIMEOUT_S
  while Time.now < deadline
    r.xread(events_key, last, count: 100, block: 1000).fetch(events_key, []).each do |entry_id, fields|
      last = entry_id
      line, final = event_line(Duogen::V1::Event.decode(fields["pb"].b))
      puts line if line
      return if final
    end
  end
  raise IOError, "no final event on #{events_key} within #{TIMEOUT_S} s"
end

# answer.md: the text parts as they are, each image as a Markdown link to its file, between
# blank lines (as the worker's result text has them); the images as image-N.png.
def write_answer(r, result, dir)
  FileUtils.mkdir_p(dir)
  md = +""
  n = 0
  result.output.each do |part|
    if part.kind == :text
      md << part.text
      next
    end
    data = case part.image.source
           when :data then part.image.data                   # the job asked for inline_images
           when :path then File.binread(part.image.path)     # the worker wrote it to a shared file system
           else r.get(part.image.key)
           end
    raise IOError, "#{part.image.key} has expired" if data.nil?
    n += 1
    File.binwrite(File.join(dir, "image-#{n}.png"), data)
    md << "\n\n![image #{n}](image-#{n}.png)\n\n"
  end
  File.write(File.join(dir, "answer.md"), md)
  puts "wrote #{dir}/answer.md and #{n} image(s)"
end

opts = {redis: "redis://127.0.0.1:6379/0", prefix: "duogen", meta: []}
begin
  OptionParser.new do |o|
    o.banner = "usage: producer.rb --redis URL [--tls-ca-file FILE] --id ID --image FILE --out DIR [--prefix P] [--meta KEY=VALUE]... TEXT..."
    %w[redis prefix id image out].each { |name| o.on("--#{name} VALUE") { |v| opts[name.to_sym] = v } }
    o.on("--tls-ca-file FILE") { |v| opts[:ca_file] = v } # with rediss://: the CA of the server's certificate
    o.on("--meta KEY=VALUE") { |v| opts[:meta] << v }
  end.parse!(ARGV)
  raise OptionParser::MissingArgument, "--id, --image, --out and TEXT" unless opts[:id] && opts[:image] && opts[:out] && !ARGV.empty?
  # the ids a worker accepts; another would be dead-lettered under an id of the worker's
  # own, and this producer would wait for a result that never comes
  raise OptionParser::InvalidArgument, "--id #{opts[:id].inspect} is not 1..128 characters of A-Z a-z 0-9 . _ : -" unless opts[:id] =~ /\A[A-Za-z0-9._:-]{1,128}\z/
rescue OptionParser::ParseError => e
  fail_with(EXIT_USAGE, e.message)
end

$stdout.sync = true
# a URL of another scheme is the command line's mistake (redis-rb takes redis://, rediss://, unix://)
unless opts[:redis] =~ %r{\A(rediss?|unix)://}
  fail_with(EXIT_USAGE, "--redis: expected redis://host:port/db, rediss://host:port/db or unix://path")
end
begin
  job = build_job(opts[:id], File.binread(opts[:image]), ARGV.join(" "), opts[:meta])
  tls = opts[:ca_file] ? {ssl_params: {ca_file: opts[:ca_file]}} : {}
  r = Redis.new(url: opts[:redis], timeout: 30, **tls)
  r.hsetnx("#{opts[:prefix]}:job:#{opts[:id]}", "state", "queued") # before the XADD: a worker's "running" comes after it
  r.xadd("#{opts[:prefix]}:jobs", {id: opts[:id], job: Duogen::V1::Job.encode(job)})
  puts "enqueued #{opts[:id]}"
  follow(r, "#{opts[:prefix]}:events:#{opts[:id]}")
  raw = r.hget("#{opts[:prefix]}:result:#{opts[:id]}", "pb") # written with the final event
  raise IOError, "no result for #{opts[:id]}" if raw.nil?
  result = Duogen::V1::Result.decode(raw.b)
  write_answer(r, result, opts[:out])
rescue Redis::BaseError, SystemCallError, IOError, OpenSSL::SSL::SSLError => e
  fail_with(EXIT_IO, e.message)
end
exit(result.status == :DONE ? 0 : EXIT_JOB)
